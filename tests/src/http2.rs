//! HTTP/2 over TLS (ALPN h2): the node mock provider (`tests/mock_h2_provider.mjs`) and the
//! two clients, `curl --http2 --parallel` (OpenSSL + nghttp2) and node's `http2` module
//! (`tests/clients/node_h2_client.mjs`), each sending every request of a plan as concurrent
//! streams on one connection.

use std::process::{Child, Command, Output, Stdio};

use serde_json::{Value, json};

use crate::{
    TempCert, TempDir,
    clients::{CURL, NODE},
    file_tail,
    mock::spawn_listening,
    tests_dir,
};

/// Completion tokens the mock reports for every answer.
pub const COMPLETION_TOKENS: u64 = 5;

/// A running HTTP/2-only mock provider on `127.0.0.1:<port>`; killed (by pid) on drop.
pub struct MockH2Provider {
    child: Child,
    pub port: u16,
    dir: TempDir,
}

impl MockH2Provider {
    /// Starts the mock with `cert` and waits (up to 20 s, [`scaled`]) for its `LISTENING`.
    pub fn start(cert: &TempCert) -> Self {
        let dir = TempDir::new("mock-h2");
        let mut cmd = Command::new(NODE);
        cmd.arg(tests_dir().join("mock_h2_provider.mjs")).arg("--cert").arg(&cert.cert).arg("--key").arg(&cert.key);
        let (child, port) = spawn_listening(cmd, "HTTP/2 mock", &dir);
        Self { child, port, dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What clients send as `:authority`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn stderr_tail(&self) -> String {
        file_tail(&self.dir.join("stderr.log"), 4000)
    }
}

impl Drop for MockH2Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One chat completion request of an HTTP/2 plan.
#[derive(Clone, Debug)]
pub struct H2Call {
    pub model: String,
    pub prompt: String,
    pub stream: bool,
    /// Streamed with `stream_options.include_usage` (else the tokens are unknown).
    pub usage: bool,
    pub headers: Vec<(String, String)>,
}

impl H2Call {
    pub fn chat(model: &str, prompt: &str) -> Self {
        Self { model: model.into(), prompt: prompt.into(), stream: false, usage: true, headers: Vec::new() }
    }

    pub fn streamed(model: &str, prompt: &str, usage: bool) -> Self {
        Self { stream: true, usage, ..Self::chat(model, prompt) }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(&self) -> Value {
        let mut body = json!({"model": self.model, "messages": [{"role": "user", "content": self.prompt}]});
        if self.stream {
            body["stream"] = json!(true);
            if self.usage {
                body["stream_options"] = json!({"include_usage": true});
            }
        }
        body
    }

    /// The status the mock answers with.
    pub fn status(&self) -> u64 {
        self.headers.iter().find(|(n, _)| n == "x-mock-status").map_or(200, |(_, v)| v.parse().expect("a status"))
    }

    /// The tokens the record must carry: the mock counts the prompt's characters.
    pub fn tokens(&self) -> (Option<u64>, Option<u64>) {
        if self.status() != 200 || (self.stream && !self.usage) {
            return (None, None);
        }
        (Some(self.prompt.chars().count() as u64), Some(COMPLETION_TOKENS))
    }
}

/// `curl --http2 --parallel` over `calls` (and a `GET /health` that is no model call), all
/// on one connection: curl waits for the first to learn that the server multiplexes.
pub fn curl_command(port: u16, calls: &[H2Call]) -> Command {
    let mut cmd = Command::new(CURL);
    cmd.args(["--parallel", "--parallel-max", "16"]);
    let url = |path: &str| format!("https://127.0.0.1:{port}{path}");
    for (i, call) in calls.iter().enumerate() {
        if i > 0 {
            cmd.arg("--next");
        }
        cmd.args(["--http2", "-sk", "-o", "/dev/null", "-w", "%{http_version} %{response_code}\\n"]);
        cmd.args(["-H", "content-type: application/json", "--compressed"]);
        for (n, v) in &call.headers {
            cmd.arg("-H").arg(format!("{n}: {v}"));
        }
        cmd.arg("--data-binary").arg(call.body().to_string()).arg(url("/v1/chat/completions"));
    }
    cmd.args(["--next", "--http2", "-sk", "-o", "/dev/null", "-w", "%{http_version} %{response_code}\\n"]);
    cmd.arg(url("/health"));
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// node's http2 client over `calls` (and a `GET /health`), concurrent streams on one session.
pub fn node_command(port: u16, calls: &[H2Call]) -> Command {
    let mut plan: Vec<Value> = calls
        .iter()
        .map(|c| {
            let headers: serde_json::Map<String, Value> =
                c.headers.iter().map(|(n, v)| (n.clone(), Value::from(v.as_str()))).collect();
            json!({"method": "POST", "path": "/v1/chat/completions", "headers": headers, "body": c.body()})
        })
        .collect();
    plan.push(json!({"method": "GET", "path": "/health"}));
    let mut cmd = Command::new(NODE);
    cmd.arg(tests_dir().join("clients/node_h2_client.mjs"))
        .arg("--port")
        .arg(port.to_string())
        .arg("--plan-json")
        .arg(Value::from(plan).to_string());
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Describes a finished client for a failure message.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
