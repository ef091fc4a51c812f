//! Containment test support: a cgroup made for the test ([`TestCgroup`]) with the real
//! clients run inside it, a bpffs pin directory guard ([`PinDir`]), the agent's
//! enforcement config ([`ContainConfig`]), the operator commands ([`ctl`]), and a
//! keep-alive client paced by the test ([`KeepAlive`]).
//!
//! Safety (see /work/shared/PLATFORM.md): the agent's connect programs attach to the test
//! cgroup only, never to the root; traffic goes to loopback only; on every exit path,
//! panics included, the guards kill the processes the test started in its cgroup (by pid,
//! nothing else), move anything else out, remove the cgroup, and remove the pin directory
//! (which unpins and so detaches whatever the agent left there with `fail = "closed"`).
//! Declare the guards so that they drop in this order: agent, clients, [`PinDir`],
//! [`TestCgroup`]. Names carry the test process's pid (`aegis-test-ct-<name>-<pid>`);
//! leftovers of a test process that died without cleaning up (SIGKILL) are removed by the
//! next run.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

use aegis_agent::kernel::cgroup2_root;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

use crate::{
    Agent, TempDir, agent_bin,
    clients::{Client, ClientOutcome, Plan, Request},
    file_tail, python_exe, require_root, scaled, tests_dir, wait_with_timeout,
};

/// Prefix of every cgroup and pin directory these helpers make.
const PREFIX: &str = "aegis-test-ct-";
/// How long a control command may take ([`scaled`] where used, like every wait here).
pub const CTL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent may take to serve its control socket after it is ready.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid at the end of `aegis-test-ct-<name>-<pid>`, if `name` is one of ours.
fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.rsplit('-').next()?.parse().ok()
}

/// Our leftovers under `dir` from test processes that no longer exist.
fn stale_entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            owner_pid(&name).is_some_and(|pid| !pid_alive(pid))
        })
        .map(|e| e.path())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Test cgroup

/// A child of the cgroup v2 root made for one test: `<mount>/aegis-test-ct-<name>-<pid>`.
///
/// Dropping it kills the processes this guard started that are still in it (by pid),
/// moves any other process out to the root (it kills nothing it did not start), and
/// removes the directory.
#[derive(Debug)]
pub struct TestCgroup {
    root: PathBuf,
    dir: PathBuf,
    rel: String,
    started: Mutex<Vec<u32>>,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        require_root();
        let root = cgroup2_root().expect("cgroup v2 is not mounted (see /proc/self/mountinfo)");
        for stale in stale_entries(&root) {
            eprintln!("removing the stale test cgroup {}", stale.display());
            evacuate_and_remove(&root, &stale, &[]);
        }
        let leaf = format!("{PREFIX}{name}-{}", std::process::id());
        let dir = root.join(&leaf);
        if dir.exists() {
            evacuate_and_remove(&root, &dir, &[]);
        }
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating the test cgroup {}: {e}", dir.display()));
        Self { root, rel: format!("/{leaf}"), dir, started: Mutex::new(Vec::new()) }
    }

    /// The cgroup directory (under the cgroup v2 mount): `enforce.cgroup` takes this.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The names of the cgroups directly under this one that start with `prefix`.
    pub fn children(&self, prefix: &str) -> Vec<String> {
        fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(prefix))
            .collect()
    }

    /// The cgroup as `/proc/PID/cgroup` names it (`/aegis-test-ct-x-123`): what
    /// `--cgroup` of the operator commands and the records' `cgroup` use.
    pub fn rel(&self) -> &str {
        &self.rel
    }

    /// Makes `cmd` start inside this cgroup: the child writes "0" (itself) to
    /// `cgroup.procs` between fork and exec.
    pub fn enter(&self, cmd: &mut Command) {
        let procs = self.dir.join("cgroup.procs");
        // SAFETY: between fork and exec only a write(2) to a path prepared before the
        // fork (std::fs::write allocates nothing else after the fork but the path's
        // CString, which is what Command's own pre_exec users do too).
        unsafe {
            cmd.pre_exec(move || fs::write(&procs, b"0"));
        }
    }

    /// Spawns `cmd` inside this cgroup; the guard remembers its pid (and kills it on drop
    /// if it is still there).
    pub fn spawn(&self, mut cmd: Command, what: &str) -> Child {
        self.enter(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {what} in {}: {e}", self.rel));
        self.started.lock().unwrap_or_else(|p| p.into_inner()).push(child.id());
        child
    }

    /// Runs `client` over `plan` to `127.0.0.1:port` from inside this cgroup, to its end.
    pub fn run(&self, client: Client, port: u16, plan: &Plan) -> ClientOutcome {
        client.run_unchecked(port, plan, |cmd| self.enter(cmd))
    }

    /// The pids in the cgroup now.
    pub fn procs(&self) -> Vec<u32> {
        read_procs(&self.dir)
    }

    /// A TCP connect to `127.0.0.1:port` from a python process inside this cgroup: 0 when
    /// it connected, else its errno (EPERM when a connect program refused it).
    pub fn connect_errno(&self, port: u16) -> i32 {
        let script = format!(
            "import socket\ns = socket.socket()\ns.settimeout(10)\nprint(s.connect_ex(('127.0.0.1', {port})))\ns.close()\n"
        );
        let mut cmd = Command::new(python_exe());
        cmd.arg("-c").arg(script).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = self.spawn(cmd, "python connect probe");
        let out = child.wait_with_output().expect("waiting for the connect probe");
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim().parse().unwrap_or_else(|_| {
            panic!("connect probe failed ({}): {text}{}", out.status, String::from_utf8_lossy(&out.stderr))
        })
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let started = self.started.lock().unwrap_or_else(|p| p.into_inner()).clone();
        evacuate_and_remove(&self.root, &self.dir, &started);
    }
}

fn read_procs(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Empties the cgroup `dir` (SIGKILL to the pids in `ours` still inside it, any other
/// process moved to `root`) and removes it, its child cgroups first. Never panics: a
/// failure is printed (the next run sweeps it).
fn evacuate_and_remove(root: &Path, dir: &Path, ours: &[u32]) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                evacuate_and_remove(root, &e.path(), ours);
            }
        }
    }
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    loop {
        for pid in read_procs(dir) {
            if ours.contains(&pid) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            } else {
                // Not started by this guard (a grandchild, or a process someone moved in):
                // not ours to kill; it goes back to the root cgroup.
                let _ = fs::write(root.join("cgroup.procs"), pid.to_string());
            }
        }
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                eprintln!(
                    "could not remove the test cgroup {} ({e}); pids still inside: {:?}",
                    dir.display(),
                    read_procs(dir)
                );
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// bpffs pin directory

/// Mounts a bpffs instance of its own at `dir` (made if missing).
fn mount_bpffs(dir: &Path) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let out = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir).output().expect("running mount");
    assert!(
        out.status.success(),
        "mounting bpffs at {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unmounts `dir` (lazily, should anything still hold it) and removes it.
fn unmount_bpffs(dir: &Path) {
    let _ = Command::new("umount").arg("-l").arg(dir).output();
    let _ = fs::remove_dir(dir);
}

/// The agent's `enforce.pin_dir` for one test: `pins` in a bpffs instance mounted for the
/// test alone at `/tmp/aegis-test-ct-bpffs-<name>-<pid>`, so that nothing the test pins
/// shows in the host's /sys/fs/bpf. Unmounted on drop, which drops (and detaches)
/// whatever is still pinned there.
#[derive(Debug)]
pub struct PinDir {
    mount: PathBuf,
    path: PathBuf,
}

impl PinDir {
    pub fn new(name: &str) -> Self {
        require_root();
        let tmp = std::env::temp_dir();
        for stale in stale_entries(&tmp).into_iter().filter(|p| p.to_string_lossy().contains("-bpffs-")) {
            eprintln!("unmounting the stale pin mount {}", stale.display());
            unmount_bpffs(&stale);
        }
        let mount = tmp.join(format!("{PREFIX}bpffs-{name}-{}", std::process::id()));
        mount_bpffs(&mount);
        Self { path: mount.join("pins"), mount }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Files under the directory, relative to it, sorted (empty when it does not exist).
    pub fn entries(&self) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(base, &p, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap_or(&p).display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.path, &self.path, &mut out);
        out.sort();
        out
    }

    /// Removes the directory and everything pinned in it. Idempotent.
    pub fn remove(&self) {
        match fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("could not remove the pin directory {}: {e}", self.path.display()),
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        self.remove();
        unmount_bpffs(&self.mount);
    }
}

// ---------------------------------------------------------------------------------------
// Agent configuration for enforcement tests

/// A provider entry (`[providers.NAME]`), the name `block --provider NAME` takes.
#[derive(Clone, Debug)]
pub struct Provider {
    pub name: String,
    pub hosts: Vec<String>,
    pub ports: Vec<u16>,
}

/// The `[enforce]`, `[enforce.gate]`, `[control]`, `[providers.*]` and `[rules]` tables of
/// an enforcement test, scoped to one test cgroup and pin directory. The control files
/// (socket, state, audit log) live in a directory of their own that outlives agent
/// restarts.
#[derive(Debug)]
pub struct ContainConfig {
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    /// "closed" (default) or "open".
    pub fail: &'static str,
    pub grace_secs: u64,
    /// `enforce.mode`; None leaves the key out, so the shipped default applies. [`Self::new`]
    /// sets "enforce": a test that expects rule verdicts to kill says so.
    pub mode: Option<&'static str>,
    /// `enforce.uninspectable` (None: the agent's default).
    pub uninspectable: Option<&'static str>,
    /// `[enforce.gate]`: enabled on these ports (None: disabled).
    pub gate_ports: Option<Vec<u16>>,
    pub providers: Vec<Provider>,
    /// Rulepacks (`[rules] packs`); empty: the embedded default pack.
    pub packs: Vec<PathBuf>,
    /// More TOML, appended as it is (tables the fields above do not cover).
    pub extra: String,
    dir: TempDir,
    /// Where the state file and the audit log go instead of `dir` (fault tests).
    state_dir: Option<PathBuf>,
    audit_dir: Option<PathBuf>,
}

impl ContainConfig {
    pub fn new(cgroup: &TestCgroup, pins: &PinDir) -> Self {
        Self {
            cgroup: cgroup.path().to_path_buf(),
            pin_dir: pins.path().to_path_buf(),
            fail: "closed",
            grace_secs: 10,
            mode: Some("enforce"),
            uninspectable: None,
            gate_ports: None,
            providers: Vec::new(),
            packs: Vec::new(),
            extra: String::new(),
            dir: TempDir::new("control"),
            state_dir: None,
            audit_dir: None,
        }
    }

    /// No `enforce.mode` in the config: the agent starts in the shipped default mode.
    pub fn shipped_mode(mut self) -> Self {
        self.mode = None;
        self
    }

    pub fn fail_open(mut self) -> Self {
        self.fail = "open";
        self
    }

    /// What content the rules could not see gets: "allow", "warn" or "block".
    pub fn uninspectable(mut self, action: &'static str) -> Self {
        self.uninspectable = Some(action);
        self
    }

    pub fn gate(mut self, ports: &[u16]) -> Self {
        self.gate_ports = Some(ports.to_vec());
        self
    }

    pub fn provider(mut self, name: &str, hosts: &[&str], ports: &[u16]) -> Self {
        self.providers.push(Provider {
            name: name.into(),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            ports: ports.to_vec(),
        });
        self
    }

    /// Writes `text` as a rulepack file in the control directory and uses it (instead of
    /// the default pack, unless the default is added too).
    pub fn pack(mut self, file_name: &str, text: &str) -> Self {
        let path = self.dir.join(file_name);
        fs::write(&path, text).expect("writing a rulepack");
        self.packs.push(path);
        self
    }

    /// Put the state file in `dir` (a small disk, for fault tests).
    pub fn state_file_in(&mut self, dir: &Path) {
        self.state_dir = Some(dir.to_owned());
    }

    /// Put the audit log in `dir` (a small disk, for fault tests).
    pub fn audit_log_in(&mut self, dir: &Path) {
        self.audit_dir = Some(dir.to_owned());
    }

    /// The directory of the control files (and rulepacks, and the evidence key).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.as_deref().unwrap_or(self.dir.path()).join("blocks.json")
    }

    pub fn audit_log(&self) -> PathBuf {
        self.audit_dir.as_deref().unwrap_or(self.dir.path()).join("audit.jsonl")
    }

    /// The TOML given to [`Agent::start_with_config`].
    pub fn toml(&self) -> String {
        let s = |p: &Path| format!("{:?}", p.display().to_string());
        let list = |v: &[String]| format!("[{}]", v.join(", "));
        let mut t = String::new();
        t += &format!(
            "[enforce]\nenabled = true\ncgroup = {}\npin_dir = {}\nfail = {:?}\ngrace_secs = {}\n",
            s(&self.cgroup),
            s(&self.pin_dir),
            self.fail,
            self.grace_secs,
        );
        if let Some(mode) = self.mode {
            t += &format!("mode = {mode:?}\n");
        }
        if let Some(action) = self.uninspectable {
            t += &format!("uninspectable = {action:?}\n");
        }
        t += "\n";
        match &self.gate_ports {
            Some(ports) => {
                let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                t += &format!("[enforce.gate]\nenabled = true\nports = {}\n\n", list(&ports));
            }
            None => t += "[enforce.gate]\nenabled = false\n\n",
        }
        t += &format!(
            "[control]\nsocket = {}\nstate_file = {}\naudit_log = {}\n\n",
            s(&self.socket()),
            s(&self.state_file()),
            s(&self.audit_log())
        );
        t += &crate::test_evidence_toml(self.dir.path());
        t += "\n";
        for p in &self.providers {
            let hosts: Vec<String> = p.hosts.iter().map(|h| format!("{h:?}")).collect();
            let ports: Vec<String> = p.ports.iter().map(u16::to_string).collect();
            t += &format!("[providers.{}]\nhosts = {}\nports = {}\n\n", p.name, list(&hosts), list(&ports));
        }
        let packs: Vec<String> = self.packs.iter().map(|p| s(p)).collect();
        t += &format!("[rules]\npacks = {}\nevidence_key = {}\n", list(&packs), s(&self.dir.join("evidence.key")));
        t += "\n";
        t += &self.extra;
        t
    }

    /// Starts the agent with this config and waits until its control socket answers.
    pub fn start_agent(&self) -> Agent {
        self.start_agent_with_env(&[])
    }

    /// [`ContainConfig::start_agent`] with `env` added to the agent's environment.
    pub fn start_agent_with_env(&self, env: &[(&str, &str)]) -> Agent {
        let agent = Agent::start_with_env(&self.toml(), env);
        let deadline = Instant::now() + scaled(SOCKET_TIMEOUT);
        loop {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "the agent is ready but its control socket {} does not answer after {:?}{}",
                self.socket().display(),
                scaled(SOCKET_TIMEOUT),
                agent.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `aegis-agent ARGS --socket <socket>`: (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        ctl(&self.socket(), args)
    }

    /// [`ContainConfig::ctl`] that must exit 0; returns its stdout, trimmed.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.ctl(args);
        assert_eq!(code, 0, "aegis-agent {args:?} exited {code}\nstdout: {out}\nstderr: {err}");
        out.trim().to_owned()
    }

    /// `block ARGS`: asserts exit 0 and a `blk-xxxxxxxx` id alone on stdout; returns (id,
    /// stderr summary).
    pub fn block(&self, args: &[&str]) -> (String, String) {
        let mut full = vec!["block"];
        full.extend_from_slice(args);
        let (code, out, err) = self.ctl(&full);
        assert_eq!(code, 0, "aegis-agent {full:?} exited {code}\nstdout: {out}\nstderr: {err}");
        let id = out.trim().to_owned();
        assert!(is_block_id(&id), "block must print the block id alone on stdout, got {out:?} (stderr: {err})");
        (id, err)
    }

    /// `blocks --json`, parsed: `{"emergency": {...}, "blocks": [...]}`.
    pub fn blocks_json(&self) -> Value {
        let out = self.ctl_ok(&["blocks", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("blocks --json is not JSON ({e}): {out}"))
    }

    /// The ids of the active blocks.
    pub fn block_ids(&self) -> Vec<String> {
        self.blocks_json()["blocks"]
            .as_array()
            .map(|bs| bs.iter().filter_map(|b| b["id"].as_str().map(String::from)).collect())
            .unwrap_or_default()
    }

    /// The audit log's lines, parsed.
    pub fn audit(&self) -> Vec<Value> {
        fs::read_to_string(self.audit_log())
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}")))
            .collect()
    }

    /// The audit log as text, for failure messages.
    pub fn audit_text(&self) -> String {
        file_tail(&self.audit_log(), 6000)
    }
}

/// `blk-` and 8 hex digits.
pub fn is_block_id(s: &str) -> bool {
    s.strip_prefix("blk-").is_some_and(|h| h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Runs `aegis-agent ARGS --socket SOCKET` (the agent binary under test) and returns
/// (exit code, stdout, stderr). Exit codes: 0 ok, 1 refused, 3 daemon unreachable, 64
/// usage error.
///
/// `--socket` goes last; should the CLI take it only before a nested subcommand (a usage
/// error naming it), it is tried once more right after the first word.
pub fn ctl(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let run = |argv: Vec<String>| {
        let mut cmd = Command::new(agent_bin());
        cmd.args(&argv).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().expect("running aegis-agent");
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(scaled(CTL_TIMEOUT)) {
            Ok(out) => out.expect("waiting for aegis-agent"),
            Err(_) => {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                panic!("aegis-agent {argv:?} (pid {pid}) did not finish within {:?}; killed", scaled(CTL_TIMEOUT));
            }
        };
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let socket = socket.display().to_string();
    let mut last: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    last.extend(["--socket".to_owned(), socket.clone()]);
    let result = run(last);
    if result.0 == i32::from(aegis_agent::commands::exit::USAGE) && result.2.contains("--socket") && args.len() > 1 {
        let mut early: Vec<String> = vec![args[0].to_owned(), "--socket".to_owned(), socket];
        early.extend(args[1..].iter().map(|a| (*a).to_owned()));
        return run(early);
    }
    result
}

// ---------------------------------------------------------------------------------------
// Keep-alive client

/// `clients/py_keepalive.py` inside a test cgroup: one TLS connection, a call each time
/// the test says so. Killed (by pid) on drop.
pub struct KeepAlive {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    /// The line of the initial connect: `{"op":"connect","ok":true,"sport":P}`.
    pub connected: Value,
    stderr: PathBuf,
    _dir: TempDir,
}

impl KeepAlive {
    /// Starts the client in `cgroup`, connected to `127.0.0.1:port`; `request` is what
    /// each `call` sends.
    pub fn start(cgroup: &TestCgroup, port: u16, request: &Request) -> Self {
        let dir = TempDir::new("keepalive");
        let stderr = dir.join("stderr");
        let mut cmd = Command::new(python_exe());
        cmd.arg(tests_dir().join("clients/py_keepalive.py"))
            .args(["--port", &port.to_string(), "--request-json"])
            .arg(request.to_plan_json().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr).expect("keep-alive stderr file"));
        let mut child = cgroup.spawn(cmd, "py_keepalive.py");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut ka = Self { child, stdin, lines, connected: Value::Null, stderr, _dir: dir };
        ka.connected = ka.next_line("connect");
        ka
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn next_line(&mut self, what: &str) -> Value {
        match self.lines.recv_timeout(scaled(Duration::from_secs(40))) {
            Ok(line) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("keep-alive client printed non-JSON ({e}): {line}")),
            Err(_) => panic!(
                "keep-alive client (pid {}) gave no answer to {what}; stderr:\n{}",
                self.child.id(),
                file_tail(&self.stderr, 4000)
            ),
        }
    }

    /// Sends a command (`call`, `reconnect`) and returns its result line.
    pub fn op(&mut self, cmd: &str) -> Value {
        writeln!(self.stdin, "{cmd}").expect("writing to the keep-alive client");
        self.stdin.flush().expect("flushing the keep-alive client's stdin");
        self.next_line(cmd)
    }

    /// Asks it to quit and waits for it.
    pub fn quit(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = wait_with_timeout(&mut self.child, "keep-alive client", Duration::from_secs(10));
    }

    pub fn stderr_tail(&self) -> String {
        file_tail(&self.stderr, 4000)
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
