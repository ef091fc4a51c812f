//! Requests, plans, and the real clients that send them: curl, python (http.client), node
//! (fetch). Each runner spawns the client directly (no shell, no shim), so the pid it
//! returns is the pid that makes the TLS calls.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use serde_json::{Value, json};

use crate::{
    TempDir, comm_of,
    expect::{Identity, TlsExpect},
    file_tail, python_exe, tests_dir, time_scale, wait_with_timeout,
};

/// How long one client run may take.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
pub const CURL: &str = "/usr/bin/curl";
pub const NODE: &str = "/usr/bin/node";
/// GNU Wget 1.21, built on GnuTLS (`libgnutls.so.30`).
pub const WGET: &str = "/usr/bin/wget";

/// One HTTP request of a plan.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// JSON body, sent compact (`serde_json::to_vec`, the same bytes the python and node
    /// clients produce for ASCII bodies).
    pub body: Option<Value>,
    /// Ask for a gzip-compressed answer (curl `--compressed`, else `Accept-Encoding: gzip`).
    pub gzip: bool,
}

impl Request {
    pub fn get(path: &str) -> Self {
        Self { method: "GET".into(), path: path.into(), headers: Vec::new(), body: None, gzip: false }
    }

    pub fn post(path: &str, body: Value) -> Self {
        Self { method: "POST".into(), path: path.into(), headers: Vec::new(), body: Some(body), gzip: false }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn gzip(mut self) -> Self {
        self.gzip = true;
        self
    }

    /// The body bytes as sent.
    pub fn body_bytes(&self) -> Vec<u8> {
        self.body.as_ref().map(|b| serde_json::to_vec(b).expect("serialising a body")).unwrap_or_default()
    }

    /// The status the mock answers with (see `mock_provider.py`).
    pub fn expected_status(&self) -> u16 {
        if let Some((_, v)) = self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("x-mock-status")) {
            return v.parse().expect("x-mock-status is a number");
        }
        let path = self.path.split('?').next().unwrap_or_default();
        let known = match self.method.as_str() {
            "GET" => matches!(path, "/health" | "/static/blob" | "/stats"),
            "POST" => {
                matches!(
                    path,
                    "/api/login"
                        | "/v1/chat/completions"
                        | "/v1/completions"
                        | "/v1/responses"
                        | "/v1/embeddings"
                        | "/v1/messages"
                        | "/api/chat"
                        | "/api/generate"
                ) || (path.starts_with("/v1beta/models/")
                    && (path.ends_with(":generateContent") || path.ends_with(":streamGenerateContent")))
            }
            _ => false,
        };
        if known { 200 } else { 404 }
    }

    /// The plan form read by `py_client.py` / `node_client.mjs`.
    pub fn to_plan_json(&self) -> Value {
        let mut headers: serde_json::Map<String, Value> =
            self.headers.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        if self.gzip {
            headers.insert("Accept-Encoding".into(), "gzip".into());
        }
        json!({"method": self.method, "path": self.path, "headers": headers, "body": self.body})
    }
}

/// Requests grouped by connection: each inner list goes, in order, over one keep-alive
/// connection; the lists run concurrently (one thread each in the python client).
#[derive(Clone, Debug)]
pub struct Plan {
    pub connections: Vec<Vec<Request>>,
}

impl Plan {
    /// All requests over one connection.
    pub fn single(requests: Vec<Request>) -> Self {
        Self { connections: vec![requests] }
    }

    pub fn requests(&self) -> impl Iterator<Item = &Request> {
        self.connections.iter().flatten()
    }

    fn to_json(&self) -> Value {
        let conns: Vec<Value> =
            self.connections.iter().map(|c| Value::Array(c.iter().map(Request::to_plan_json).collect())).collect();
        if conns.len() == 1 { conns.into_iter().next().expect("one") } else { json!({ "connections": conns }) }
    }
}

/// One response line printed by a client.
#[derive(Clone, Debug)]
pub struct ClientResponse {
    pub conn: usize,
    pub index: usize,
    pub status: u16,
    pub bytes: u64,
    /// Thread that sent it (python client only).
    pub tid: Option<u32>,
    /// New connections opened for it (curl only).
    pub num_connects: Option<u64>,
    /// Content-Encoding of the answer.
    pub content_encoding: Option<String>,
    /// The answering mock's `x-mock-server` header (`mock_provider.py --name`).
    pub server: Option<String>,
}

/// A finished client run.
#[derive(Debug)]
pub struct ClientRun {
    pub client: &'static str,
    /// The process the agent should name as the caller.
    pub identity: Identity,
    pub responses: Vec<ClientResponse>,
    pub stderr: String,
}

impl ClientRun {
    pub fn pid(&self) -> u32 {
        self.identity.pid
    }

    /// Every request of `plan` got its response, with the status the mock gives, and
    /// each connection's requests went over a single connection where the client says so.
    pub fn assert_responses(&self, plan: &Plan) {
        let expected: usize = plan.connections.iter().map(Vec::len).sum();
        assert_eq!(
            self.responses.len(),
            expected,
            "{} printed {} responses for {expected} requests; stderr:\n{}",
            self.client,
            self.responses.len(),
            self.stderr
        );
        for (c, reqs) in plan.connections.iter().enumerate() {
            for (i, req) in reqs.iter().enumerate() {
                let resp = self
                    .responses
                    .iter()
                    .find(|r| r.conn == c && r.index == i)
                    .unwrap_or_else(|| panic!("{}: no response for connection {c} request {i}", self.client));
                assert_eq!(
                    resp.status,
                    req.expected_status(),
                    "{}: status of {} {}",
                    self.client,
                    req.method,
                    req.path
                );
                assert!(resp.bytes > 0 || req.method == "HEAD", "{}: empty body for {}", self.client, req.path);
                if req.gzip && resp.status == 200 {
                    assert_eq!(
                        resp.content_encoding.as_deref(),
                        Some("gzip"),
                        "{}: {} was not gzip-compressed",
                        self.client,
                        req.path
                    );
                }
                if let Some(n) = resp.num_connects {
                    assert_eq!(
                        n,
                        u64::from(i == 0),
                        "{}: request {i} ({}) did not reuse the connection",
                        self.client,
                        req.path
                    );
                }
            }
        }
    }
}

fn parse_response(v: &Value) -> Option<ClientResponse> {
    let num = |k: &str| v.get(k).and_then(Value::as_u64);
    let text = |k: &str| v.get(k).and_then(Value::as_str).filter(|e| !e.is_empty()).map(String::from);
    Some(ClientResponse {
        conn: num("conn").unwrap_or(0) as usize,
        index: num("i")? as usize,
        status: num("status")? as u16,
        bytes: num("bytes")?,
        tid: num("tid").map(|t| t as u32),
        num_connects: num("num_connects"),
        content_encoding: text("content_encoding"),
        server: text("server"),
    })
}

fn parse_responses(client: &str, stdout: &str) -> Vec<ClientResponse> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{client} printed non-JSON ({e}): {line}"));
            parse_response(&v).unwrap_or_else(|| panic!("{client} printed an incomplete line: {line}"))
        })
        .collect()
}

/// The response lines of a run that may have failed: lines that are not a complete
/// response are skipped (curl prints `"status":000` for a request that got no answer).
fn parse_responses_lenient(stdout: &str) -> Vec<ClientResponse> {
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|v| parse_response(&v))
        .filter(|r| r.status > 0)
        .collect()
}

/// A client process that ran to completion (or was killed at [`CLIENT_TIMEOUT`]).
struct Finished {
    pid: u32,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to completion with stdout/stderr captured to files.
fn exec_client(client: &'static str, mut cmd: Command) -> Finished {
    let dir = TempDir::new(client);
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("client stdout file"))
        .stderr(File::create(&err_path).expect("client stderr file"));
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {client}: {e}"));
    let pid = child.id();
    let status = wait_with_timeout(&mut child, client, CLIENT_TIMEOUT);
    Finished {
        pid,
        status,
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: file_tail(&err_path, 4000),
    }
}

/// Runs `cmd` to completion and asserts it succeeded; returns (pid, stdout, stderr).
fn run_client(client: &'static str, cmd: Command) -> (u32, String, String) {
    let f = exec_client(client, cmd);
    assert!(f.status.success(), "{client} failed ({}); stdout:\n{}\nstderr:\n{}", f.status, f.stdout, f.stderr);
    (f.pid, f.stdout, f.stderr)
}

fn identity(pid: u32, exe: &Path, tls: TlsExpect, single_thread: bool) -> Identity {
    Identity { pid, comm: comm_of(exe), exe: exe.to_path_buf(), tls, single_thread }
}

fn write_plan(plan: &Plan) -> (TempDir, PathBuf) {
    let dir = TempDir::new("plan");
    let path = dir.join("plan.json");
    fs::write(&path, serde_json::to_vec_pretty(&plan.to_json()).expect("plan JSON")).expect("writing plan");
    (dir, path)
}

/// One of the three real clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// One `curl -sSk --http1.1` for a single-connection plan.
    Curl,
    /// `py_client.py` on the real interpreter (http.client, system libssl).
    Python,
    /// `node_client.mjs` on `/usr/bin/node` (fetch, OpenSSL inside node).
    Node,
}

impl Client {
    pub const ALL: [Client; 3] = [Client::Curl, Client::Python, Client::Node];

    pub fn name(self) -> &'static str {
        match self {
            Client::Curl => "curl",
            Client::Python => "python",
            Client::Node => "node",
        }
    }

    /// The process the agent should name as the caller of a run of `plan`.
    pub fn identity(self, pid: u32, plan: &Plan) -> Identity {
        match self {
            Client::Curl => identity(pid, Path::new(CURL), TlsExpect::LibSsl, true),
            Client::Python => identity(pid, python_exe(), TlsExpect::LibSsl, plan.connections.len() == 1),
            Client::Node => identity(pid, Path::new(NODE), TlsExpect::Binary(NODE.into()), true),
        }
    }

    /// The command that sends `plan` to `127.0.0.1:port`, and the directory holding its
    /// plan file (keep it until the command has run).
    pub fn command(self, port: u16, plan: &Plan) -> (Option<TempDir>, Command) {
        match self {
            Client::Curl => (None, curl_command(port, plan)),
            Client::Python => {
                let (dir, plan_path) = write_plan(plan);
                let mut cmd = Command::new(python_exe());
                cmd.arg(tests_dir().join("clients/py_client.py"))
                    .arg("--port")
                    .arg(port.to_string())
                    .arg("--plan")
                    .arg(&plan_path);
                (Some(dir), cmd)
            }
            Client::Node => {
                let (dir, plan_path) = write_plan(plan);
                let mut cmd = Command::new(NODE);
                cmd.env("NODE_TLS_REJECT_UNAUTHORIZED", "0")
                    .arg(tests_dir().join("clients/node_client.mjs"))
                    .arg("--port")
                    .arg(port.to_string())
                    .arg("--plan")
                    .arg(&plan_path);
                (Some(dir), cmd)
            }
        }
    }

    /// Runs the client over `plan` and asserts it exited 0.
    pub fn run(self, port: u16, plan: &Plan) -> ClientRun {
        let (_dir, cmd) = self.command(port, plan);
        let (pid, stdout, stderr) = run_client(self.name(), cmd);
        ClientRun {
            client: self.name(),
            identity: self.identity(pid, plan),
            responses: parse_responses(self.name(), &stdout),
            stderr,
        }
    }

    /// Runs the client over `plan`, `prepare` adjusting its command first (e.g. to start
    /// it in a test cgroup), and returns how it ended whatever that was.
    pub fn run_unchecked(self, port: u16, plan: &Plan, prepare: impl FnOnce(&mut Command)) -> ClientOutcome {
        let (_dir, mut cmd) = self.command(port, plan);
        prepare(&mut cmd);
        let f = exec_client(self.name(), cmd);
        ClientOutcome {
            client: self,
            identity: self.identity(f.pid, plan),
            responses: parse_responses_lenient(&f.stdout),
            status: f.status,
            stdout: f.stdout,
            stderr: f.stderr,
            plan: plan.clone(),
        }
    }
}

/// A client run that may have failed.
#[derive(Debug)]
pub struct ClientOutcome {
    pub client: Client,
    pub identity: Identity,
    pub status: ExitStatus,
    /// The complete answers it printed (requests without an answer left out).
    pub responses: Vec<ClientResponse>,
    pub stdout: String,
    pub stderr: String,
    plan: Plan,
}

impl ClientOutcome {
    pub fn pid(&self) -> u32 {
        self.identity.pid
    }

    /// Which client, its pid, exit status, stdout and stderr: for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "{} (pid {}) exited {}; stdout:\n{}\nstderr:\n{}",
            self.client.name(),
            self.pid(),
            self.status,
            self.stdout,
            self.stderr
        )
    }

    /// Its first connect was refused with EPERM (a cgroup connect program said no): curl
    /// exits 7, python raises PermissionError, node reports EPERM; no answer came.
    pub fn connect_refused(&self) -> bool {
        let refused = match self.client {
            // curl 7.88 says "Failed to connect to 127.0.0.1 port P after 0 ms: Couldn't
            // connect to server"; newer ones add the errno text.
            Client::Curl => {
                self.status.code() == Some(7)
                    && (self.stderr.contains("Operation not permitted")
                        || self.stderr.contains("Failed to connect")
                        || self.stderr.contains("Couldn't connect"))
            }
            Client::Python => {
                self.status.code() == Some(1)
                    && (self.stderr.contains("PermissionError") || self.stderr.contains("[Errno 1]"))
            }
            Client::Node => self.status.code() == Some(1) && self.stderr.contains("EPERM"),
        };
        refused && self.responses.is_empty()
    }

    /// See [`ClientOutcome::connect_refused`]; `context` ends the panic message (agent logs).
    pub fn assert_connect_refused(&self, context: &str) {
        assert!(self.connect_refused(), "expected a connect refused with EPERM: {}{context}", self.describe());
    }

    /// It failed and no request got an answer (its connection was destroyed or its send
    /// refused).
    pub fn assert_no_answer(&self, context: &str) {
        assert!(
            !self.status.success() && self.responses.is_empty(),
            "expected the call to fail without an answer: {}{context}",
            self.describe()
        );
    }

    /// It exited 0 and every request got the answer the mock gives (see
    /// [`ClientRun::assert_responses`]); returns it as a [`ClientRun`].
    pub fn assert_ok(self, context: &str) -> ClientRun {
        assert!(self.status.success(), "{} should have succeeded{context}", self.describe());
        let run = ClientRun {
            client: self.client.name(),
            identity: self.identity,
            responses: self.responses,
            stderr: self.stderr,
        };
        run.assert_responses(&self.plan);
        run
    }
}

/// Runs `py_client.py` (real interpreter, no shim) against `127.0.0.1:port`.
pub fn run_python(port: u16, plan: &Plan) -> ClientRun {
    Client::Python.run(port, plan)
}

/// Runs `node_client.mjs` with `/usr/bin/node` (certificate checks off).
pub fn run_node(port: u16, plan: &Plan) -> ClientRun {
    Client::Node.run(port, plan)
}

/// Runs ONE `curl -sSk --http1.1` for all requests of a single-connection plan (`--next`
/// between them), so they share one keep-alive connection.
pub fn run_curl(port: u16, plan: &Plan) -> ClientRun {
    Client::Curl.run(port, plan)
}

/// Runs ONE `wget` (GnuTLS) for the single request of `plan`: wget sends the same body to
/// every URL it is given, so each request is a process of its own. Asserts it exited 0 (wget
/// exits 8 when the server answers with an error) and returns its pid and the body it got.
pub fn run_wget(port: u16, plan: &Plan) -> (u32, String) {
    let reqs: Vec<&Request> = plan.requests().collect();
    assert_eq!(reqs.len(), 1, "run_wget takes a plan of one request");
    let req = reqs[0];
    let mut cmd = Command::new(WGET);
    cmd.args(["-q", "--no-check-certificate", "--no-config", "-O", "-", "--method", &req.method]);
    for (k, v) in &req.headers {
        cmd.arg(format!("--header={k}: {v}"));
    }
    if req.body.is_some() {
        cmd.arg("--header=Content-Type: application/json");
        cmd.arg("--body-data").arg(String::from_utf8(req.body_bytes()).expect("UTF-8 body"));
    }
    cmd.arg(format!("https://127.0.0.1:{port}{}", req.path));
    let (pid, stdout, _) = run_client("wget", cmd);
    (pid, stdout)
}

/// How the C test client (`clients/tls_client.c`) was built (by the build script).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CClient {
    /// Against BoringSSL (Debian's android-libboringssl, a shared library).
    BoringSsl,
    /// With OpenSSL's static libraries: `SSL_*` only in the executable's `.symtab`.
    StaticOpenSsl,
    /// The same, stripped: no symbol names the functions.
    StaticStripped,
    /// A shared object with OpenSSL compiled in that exports only its entry point, loaded
    /// by python through ctypes (as an extension module carrying a TLS copy is).
    PythonModule,
}

/// Loads the module of [`CClient::PythonModule`] and runs its client with the arguments
/// that follow.
const MODULE_LOADER_PY: &str = "import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
args = [b'tls_client'] + [a.encode() for a in sys.argv[2:]]
sys.exit(lib.tls_client_main(len(args), (ctypes.c_char_p * len(args))(*args)))
";

/// BoringSSL's libssl as Debian installs it (android-libboringssl).
pub const BORINGSSL_LIB: &str = "/usr/lib/x86_64-linux-gnu/android/libssl.so.0";

impl CClient {
    /// The executable (the shared object for [`CClient::PythonModule`]). Panics saying why
    /// when it could not be built.
    pub fn path(self) -> PathBuf {
        let built = match self {
            CClient::BoringSsl => env!("TLS_CLIENT_BORINGSSL"),
            CClient::StaticOpenSsl => env!("TLS_CLIENT_STATIC"),
            CClient::StaticStripped => env!("TLS_CLIENT_STATIC_STRIPPED"),
            CClient::PythonModule => env!("TLS_CLIENT_MODULE"),
        };
        if let Some(why) = built.strip_prefix('!') {
            panic!("the C test client ({self:?}) was not built when the tests were: {why}");
        }
        PathBuf::from(built)
    }

    /// Who the agent should name for its process `pid`.
    pub fn identity(self, pid: u32) -> Identity {
        let path = self.path();
        match self {
            CClient::BoringSsl => identity(pid, &path, TlsExpect::BoringSsl(BORINGSSL_LIB.into()), true),
            CClient::StaticOpenSsl | CClient::StaticStripped => {
                identity(pid, &path, TlsExpect::Binary(path.clone()), true)
            }
            CClient::PythonModule => identity(pid, python_exe(), TlsExpect::Binary(path), true),
        }
    }

    /// Its command line, its arguments to follow.
    fn command(self) -> Command {
        match self {
            CClient::PythonModule => {
                let mut cmd = Command::new(python_exe());
                cmd.arg("-c").arg(MODULE_LOADER_PY).arg(self.path());
                cmd
            }
            _ => Command::new(self.path()),
        }
    }
}

/// `req` as HTTP/1.1 bytes for 127.0.0.1:`port`, the connection closed after it.
pub fn http1_request(req: &Request, port: u16) -> Vec<u8> {
    let body = req.body_bytes();
    let mut head = format!("{} {} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n", req.method, req.path);
    for (k, v) in &req.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if req.gzip {
        head.push_str("Accept-Encoding: gzip\r\n");
    }
    if req.body.is_some() {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// Runs the C test client `client` over a plan of one request, staying `linger_ms` after
/// it; asserts it exited 0 and returns (pid, the raw response).
pub fn run_c_client(client: CClient, port: u16, plan: &Plan, linger_ms: u32) -> (u32, String) {
    run_c_client_after(client, port, plan, 0, linger_ms)
}

/// [`run_c_client`], the client waiting `delay_ms` after its start before it connects.
pub fn run_c_client_after(client: CClient, port: u16, plan: &Plan, delay_ms: u32, linger_ms: u32) -> (u32, String) {
    let reqs: Vec<&Request> = plan.requests().collect();
    assert_eq!(reqs.len(), 1, "run_c_client takes a plan of one request");
    let dir = TempDir::new("c-client");
    let path = dir.join("request");
    fs::write(&path, http1_request(reqs[0], port)).expect("writing the request");
    let mut cmd = client.command();
    cmd.arg(port.to_string()).arg(&path).arg(linger_ms.to_string());
    if delay_ms > 0 {
        cmd.env("TLS_CLIENT_DELAY_MS", delay_ms.to_string());
    }
    let (pid, stdout, _) = run_client("tls_client", cmd);
    (pid, stdout)
}

/// The Go test client (`clients/go_client.go`, built by the build script), plain or built
/// with `-ldflags=-s -w` (no ELF symbols, no DWARF). Panics saying why when `go` could not
/// build it.
pub fn go_client(stripped: bool) -> PathBuf {
    let built = if stripped { env!("GO_CLIENT_STRIPPED") } else { env!("GO_CLIENT") };
    if let Some(why) = built.strip_prefix('!') {
        panic!("the Go test client was not built when the tests were: {why}");
    }
    PathBuf::from(built)
}

/// The agent's `[capture]` table adding both Go test clients to the default executables to
/// probe from the start (node's stay: the HTTP/2 mock is node), with the correlation window
/// scaled as the default one is where everything runs slower.
pub fn go_capture_toml() -> String {
    let defaults = aegis_agent::config::Config::defaults().capture;
    let window = defaults.correlation_window_ms * u64::from(time_scale());
    let mut executables: Vec<String> = defaults.executables.iter().map(|p| p.display().to_string()).collect();
    executables.extend([false, true].map(|stripped| go_client(stripped).display().to_string()));
    format!("[capture]\nexecutables = {executables:?}\ncorrelation_window_ms = {window}\n")
}

/// The Go test client's command over `plan` (keep the directory until it has run): HTTP/1.1,
/// or with `http2` ALPN h2 and concurrent streams after each connection's first request.
pub fn go_command(port: u16, plan: &Plan, stripped: bool, http2: bool) -> (TempDir, Command) {
    let (dir, plan_path) = write_plan(plan);
    let mut cmd = Command::new(go_client(stripped));
    cmd.arg("--port").arg(port.to_string()).arg("--plan").arg(&plan_path);
    if http2 {
        cmd.arg("--http2");
    }
    (dir, cmd)
}

/// Runs the Go test client ([`go_client`]) over `plan`: Go's net/http over Go's crypto/tls,
/// HTTP/1.1, one connection per list of the plan. Asserts it exited 0.
pub fn run_go(port: u16, plan: &Plan, stripped: bool) -> ClientRun {
    let exe = go_client(stripped);
    let (_dir, cmd) = go_command(port, plan, stripped, false);
    let (pid, stdout, stderr) = run_client("go", cmd);
    ClientRun {
        client: "go",
        // Goroutines run on several threads: calls come from any of them.
        identity: identity(pid, &exe, TlsExpect::Go(exe.clone()), false),
        responses: parse_responses("go", &stdout),
        stderr,
    }
}

/// The caller the agent should name for a [`run_wget`] process.
pub fn wget_identity(pid: u32) -> Identity {
    identity(pid, Path::new(WGET), TlsExpect::GnuTls, true)
}

fn curl_command(port: u16, plan: &Plan) -> Command {
    assert_eq!(plan.connections.len(), 1, "run_curl takes a single-connection plan");
    let mut cmd = Command::new(CURL);
    for (i, req) in plan.connections[0].iter().enumerate() {
        if i > 0 {
            cmd.arg("--next");
        }
        let write_out = format!(
            "{{\"i\":{i},\"status\":%{{http_code}},\"bytes\":%{{size_download}},\"num_connects\":%{{num_connects}},\"content_encoding\":\"%header{{content-encoding}}\",\"server\":\"%header{{x-mock-server}}\"}}\\n"
        );
        cmd.args(["-sSk", "--http1.1", "-o", "/dev/null", "-w", &write_out, "-X", &req.method]);
        if req.gzip {
            cmd.arg("--compressed");
        }
        for (k, v) in &req.headers {
            cmd.arg("-H").arg(format!("{k}: {v}"));
        }
        if req.body.is_some() {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary"]);
            cmd.arg(String::from_utf8(req.body_bytes()).expect("UTF-8 body"));
        }
        cmd.arg(format!("https://127.0.0.1:{port}{}", req.path));
    }
    cmd
}
