//! Support for the AegisPlane integration tests.
//!
//! The tests run the real agent (`target/<profile>/aegis-agent`, or `$AEGIS_AGENT_BIN`)
//! against real TLS clients (curl, python, node) talking to a local TLS mock model
//! provider (`tests/mock_provider.py`), then compare the JSON lines the agent wrote with
//! the calls that were made.
//!
//! - [`TempDir`], [`TempCert`]: scratch space and a self-signed certificate.
//! - [`MockProvider`]: the mock provider process.
//! - [`http2`]: the HTTP/2 mock provider and the `curl --http2` and node `http2` clients.
//! - [`Agent`]: the agent process, its config, its records.
//! - [`clients`]: requests, plans, and the curl/python/node runners.
//! - [`expect`]: what the agent should report for a request, and the checks.
//! - [`plans`]: the request mixes the tests send.
//! - [`contain`]: containment tests: a test cgroup and its clients, the bpffs pin
//!   directory, the enforcement config, the operator commands, a keep-alive client.
//!
//! Tests that load eBPF need root and must hold [`serial()`] (one agent at a time).
//! Build the agent first: `cargo build -p aegis-agent && cargo test -p aegis-tests`.

pub mod agent;
pub mod clients;
pub mod collector;
pub mod contain;
pub mod expect;
pub mod fleet;
pub mod http2;
pub mod mock;
pub mod plans;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

pub use agent::{Agent, agent_bin, test_control_toml, test_evidence_toml};
pub use clients::{Client, ClientOutcome, ClientRun, Plan, Request, run_curl, run_node, run_python};
pub use contain::{ContainConfig, KeepAlive, PinDir, TestCgroup, ctl};
pub use expect::{
    ExpectedCall, Identity, TlsExpect, Tokens, assert_calls, assert_no_secrets, check_calls, expected_calls,
    expected_input_tokens,
};
pub use mock::MockProvider;

/// Serialises the tests of one test binary: each starts its own agent, and two agents
/// attached at once would see (and report) each other's traffic.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A failed test poisons the lock; the next test must still run.
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Fails (never skips) when not root: loading eBPF and attaching uprobes needs it.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these integration tests load eBPF programs and must run as root \
         (e.g. `sudo -E env PATH=$PATH cargo test -p aegis-tests`)"
    );
}

/// `tests/` (this crate's directory).
pub fn tests_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The workspace root.
pub fn workspace_dir() -> &'static Path {
    tests_dir().parent().expect("tests/ has a parent")
}

/// The real python interpreter (pyenv shims resolved), so the pid we spawn is the pid that
/// makes the TLS calls and `exe` is predictable. `$AEGIS_TEST_PYTHON` overrides.
pub fn python_exe() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let found = match std::env::var_os("AEGIS_TEST_PYTHON") {
            Some(p) => PathBuf::from(p),
            None => {
                let out = Command::new("python3")
                    .args(["-c", "import sys; print(sys.executable)"])
                    .output()
                    .expect("running python3 (needed by the tests)");
                assert!(out.status.success(), "python3 failed: {}", String::from_utf8_lossy(&out.stderr));
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
        };
        fs::canonicalize(&found).unwrap_or_else(|e| panic!("resolving {}: {e}", found.display()))
    })
}

/// What the kernel reports as `comm` for a process exec'd from `exe`: the file name, cut
/// to 15 bytes (TASK_COMM_LEN - 1).
pub fn comm_of(exe: &Path) -> String {
    let name = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.chars()
        .scan(0, |len, c| {
            *len += c.len_utf8();
            (*len <= 15).then_some(c)
        })
        .collect()
}

/// A directory under the system temp dir, removed on drop unless `$AEGIS_TEST_KEEP` is set.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let template = std::env::temp_dir().join(format!("aegis-{prefix}-XXXXXX"));
        let path = nix::unistd::mkdtemp(&template).expect("creating a temp dir");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("AEGIS_TEST_KEEP").is_some() {
            eprintln!("keeping {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A self-signed EC certificate for `127.0.0.1` and `localhost`, made with the openssl CLI.
#[derive(Debug)]
pub struct TempCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: TempDir,
}

impl TempCert {
    pub fn generate() -> Self {
        let dir = TempDir::new("cert");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .args(["-days", "2", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
            .stdin(Stdio::null())
            .output()
            .expect("running the openssl CLI");
        assert!(out.status.success(), "openssl req failed: {}", String::from_utf8_lossy(&out.stderr));
        Self { cert, key, _dir: dir }
    }
}

/// The last `max` bytes of a (log) file, for panic messages.
pub fn file_tail(path: &Path, max: usize) -> String {
    let data = fs::read(path).unwrap_or_default();
    let start = data.len().saturating_sub(max);
    let text = String::from_utf8_lossy(&data[start..]).into_owned();
    if start > 0 { format!("[...]{text}") } else { text }
}

/// `wait` stretched by `$AEGIS_TEST_TIME_SCALE` (a whole number, default 1). Every wait
/// of these tests for something to happen (the agent ready, a record written, a client
/// done) goes through it: they are tuned for a machine running natively, and the kernel
/// matrix runs the tests in VMs that qemu emulates without KVM, several times slower.
pub fn scaled(wait: Duration) -> Duration {
    wait * time_scale()
}

/// `$AEGIS_TEST_TIME_SCALE`, 1 when unset (see [`scaled`]).
pub fn time_scale() -> u32 {
    static SCALE: OnceLock<u32> = OnceLock::new();
    *SCALE.get_or_init(|| match std::env::var("AEGIS_TEST_TIME_SCALE") {
        Err(_) => 1,
        Ok(s) => s
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .unwrap_or_else(|| panic!("AEGIS_TEST_TIME_SCALE must be a whole number >= 1, not {s:?}")),
    })
}

/// Waits for a child up to `timeout` ([`scaled`]), then kills it (by its pid) and panics.
pub fn wait_with_timeout(child: &mut Child, what: &str, timeout: Duration) -> ExitStatus {
    let timeout = scaled(timeout);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} (pid {}) did not finish within {timeout:?}; killed", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
