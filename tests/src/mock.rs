//! The TLS mock model provider (`tests/mock_provider.py`) as a child process.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

use crate::{
    TempCert, TempDir,
    clients::CURL,
    comm_of,
    expect::{Identity, TlsExpect},
    file_tail, python_exe, scaled, tests_dir,
};

/// A running mock provider on `127.0.0.1:<port>`; killed (by pid) on drop.
pub struct MockProvider {
    child: Child,
    pub port: u16,
    dir: TempDir,
}

impl MockProvider {
    /// Starts the mock with `cert` and waits (up to 20 s, [`scaled`]) for its `LISTENING
    /// <port>` line.
    pub fn start(cert: &TempCert) -> Self {
        Self::start_inner(cert, None)
    }

    /// Like [`MockProvider::start`], with `--name NAME`: every response carries
    /// `x-mock-server: NAME` and chat replies start with `[NAME] ` (a fallback server).
    pub fn start_named(cert: &TempCert, name: &str) -> Self {
        Self::start_inner(cert, Some(name))
    }

    fn start_inner(cert: &TempCert, name: Option<&str>) -> Self {
        let dir = TempDir::new("mock");
        let mut cmd = Command::new(python_exe());
        cmd.arg(tests_dir().join("mock_provider.py"))
            .arg("--cert")
            .arg(&cert.cert)
            .arg("--key")
            .arg(&cert.key)
            .args(["--port", "0"]);
        if std::env::var_os("AEGIS_TEST_VERBOSE").is_some() {
            cmd.arg("--verbose");
        }
        if let Some(name) = name {
            cmd.arg("--name").arg(name);
        }
        let (child, port) = spawn_listening(cmd, "mock provider", &dir);
        Self { child, port, dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `127.0.0.1:<port>`, the Host header every client sends.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The process the agent should name as the server end.
    pub fn identity(&self) -> Identity {
        Identity {
            pid: self.pid(),
            comm: comm_of(python_exe()),
            exe: python_exe().to_path_buf(),
            tls: TlsExpect::LibSsl,
            single_thread: false,
        }
    }

    /// `GET /stats` (asked by curl from this process, outside any test cgroup):
    /// `{"requests": N, "by_path": {"<path?query>": n}}`, the requests whose request line and
    /// headers the mock read.
    pub fn stats(&self) -> Value {
        let out = Command::new(CURL)
            .args(["-sSk", "--max-time", "10"])
            .arg(format!("https://127.0.0.1:{}/stats", self.port))
            .stdin(Stdio::null())
            .output()
            .expect("running curl for the mock's /stats");
        assert!(
            out.status.success(),
            "GET /stats failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.stderr_tail()
        );
        serde_json::from_slice(&out.stdout).expect("/stats is JSON")
    }

    /// How many requests to `path_and_query` the mock read (see [`MockProvider::stats`]).
    pub fn requests_to(&self, path_and_query: &str) -> u64 {
        self.stats()["by_path"][path_and_query].as_u64().unwrap_or(0)
    }

    /// The mock's stderr so far (tracebacks; request log with `$AEGIS_TEST_VERBOSE`).
    pub fn stderr_tail(&self) -> String {
        file_tail(&self.dir.join("stderr.log"), 4000)
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns a mock server (`cmd`, its stderr to `dir/stderr.log`) and waits (up to 20 s,
/// [`scaled`]) for its first line, `LISTENING <port>`; on anything else it is killed and the
/// test fails with the line and the end of its stderr. `what` names it in that message.
pub(crate) fn spawn_listening(mut cmd: Command, what: &str, dir: &TempDir) -> (Child, u16) {
    let stderr = File::create(dir.join("stderr.log")).expect("creating mock stderr log");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning the {what}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(scaled(Duration::from_secs(20))).unwrap_or_default();
    let Some(port) = line.trim().strip_prefix("LISTENING ").and_then(|p| p.parse().ok()) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} did not start (first line {line:?}); stderr:\n{}", file_tail(&dir.join("stderr.log"), 4000));
    };
    (child, port)
}
