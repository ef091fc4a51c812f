//! What the agent should report for the requests a test made, and the record checks.

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
};

use serde_json::Value;

use crate::clients::{Plan, Request};

/// Output tokens of every mock answer ("This is a mock reply from the AegisPlane test
/// provider." = 10 words).
pub const OUTPUT_TOKENS: u64 = 10;
/// Top-level request keys whose strings count as input (mirrors `mock_provider.py`).
pub const INPUT_KEYS: [&str; 6] = ["messages", "prompt", "input", "contents", "system", "instructions"];
/// Object keys whose string values do not count (mirrors `mock_provider.py`).
pub const SKIP_KEYS: [&str; 2] = ["role", "type"];

/// The mock's input token count for a request body: whitespace-separated words of every
/// string found recursively under [`INPUT_KEYS`], skipping strings whose object key is in
/// [`SKIP_KEYS`]. Exactly `count_input_words` of `mock_provider.py`.
pub fn expected_input_tokens(body: &Value) -> u64 {
    fn words(v: &Value, key: &str) -> u64 {
        match v {
            Value::String(s) if !SKIP_KEYS.contains(&key) => s.split_whitespace().count() as u64,
            Value::Array(items) => items.iter().map(|i| words(i, key)).sum(),
            Value::Object(map) => map.iter().map(|(k, v)| words(v, k)).sum(),
            _ => 0,
        }
    }
    let Some(map) = body.as_object() else {
        return 0;
    };
    INPUT_KEYS.iter().filter_map(|k| map.get(*k).map(|v| words(v, k))).sum()
}

/// An expected token field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tokens {
    Exact(u64),
    /// The response carries no usage: the record must say null.
    Null,
    /// Not reported by this API (embeddings' output): null or 0.
    NullOrZero,
}

impl Tokens {
    fn matches(self, v: &Value) -> bool {
        match self {
            Tokens::Exact(n) => v.as_u64() == Some(n),
            Tokens::Null => v.is_null(),
            Tokens::NullOrZero => v.is_null() || v.as_u64() == Some(0),
        }
    }
}

/// One model API call the agent must report.
#[derive(Clone, Debug)]
pub struct ExpectedCall {
    pub api: &'static str,
    /// Path without the query.
    pub path: String,
    pub model: String,
    pub stream: bool,
    pub status: u16,
    pub input_tokens: Tokens,
    pub output_tokens: Tokens,
    /// Asserted only when known for the API.
    pub finish_reason: Option<&'static str>,
    pub request_body_len: usize,
}

impl ExpectedCall {
    /// What the agent should report for `req`, or None for a request that is not a model
    /// API call (and must not be reported).
    pub fn for_request(req: &Request) -> Option<Self> {
        if req.method != "POST" {
            return None;
        }
        let body = req.body.clone().unwrap_or(Value::Null);
        let path = req.path.split('?').next().unwrap_or_default().to_string();
        let body_model = || body.get("model").and_then(Value::as_str).unwrap_or("unknown").to_string();
        let stream_flag = body.get("stream") == Some(&Value::Bool(true));
        let include_usage = body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
        let n_in = expected_input_tokens(&body);
        let (api, model, stream, input, output, finish) = match path.as_str() {
            "/v1/chat/completions" | "/v1/completions" => {
                let api = if path == "/v1/chat/completions" { "chat_completions" } else { "completions" };
                let (i, o) = if stream_flag && !include_usage {
                    (Tokens::Null, Tokens::Null)
                } else {
                    (Tokens::Exact(n_in), Tokens::Exact(OUTPUT_TOKENS))
                };
                (api, body_model(), stream_flag, i, o, Some("stop"))
            }
            "/v1/responses" => {
                ("responses", body_model(), stream_flag, Tokens::Exact(n_in), Tokens::Exact(OUTPUT_TOKENS), None)
            }
            "/v1/embeddings" => ("embeddings", body_model(), false, Tokens::Exact(n_in), Tokens::NullOrZero, None),
            "/v1/messages" => (
                "anthropic_messages",
                body_model(),
                stream_flag,
                Tokens::Exact(n_in),
                Tokens::Exact(OUTPUT_TOKENS),
                Some("end_turn"),
            ),
            "/api/chat" | "/api/generate" => {
                let api = if path == "/api/chat" { "ollama_chat" } else { "ollama_generate" };
                let stream = body.get("stream") != Some(&Value::Bool(false));
                (api, body_model(), stream, Tokens::Exact(n_in), Tokens::Exact(OUTPUT_TOKENS), None)
            }
            p if p.starts_with("/v1beta/models/") => {
                let (model, method) = p["/v1beta/models/".len()..].split_once(':')?;
                let stream = match method {
                    "generateContent" => false,
                    "streamGenerateContent" => true,
                    _ => return None,
                };
                let (i, o) = (Tokens::Exact(n_in), Tokens::Exact(OUTPUT_TOKENS));
                ("gemini_generate_content", model.to_string(), stream, i, o, None)
            }
            _ => return None,
        };
        let status = req.expected_status();
        let (input, output, finish) =
            if status == 200 { (input, output, finish) } else { (Tokens::Null, Tokens::Null, None) };
        Some(Self {
            api,
            path,
            model,
            stream,
            status,
            input_tokens: input,
            output_tokens: output,
            finish_reason: finish,
            request_body_len: req.body_bytes().len(),
        })
    }

    fn key(&self) -> (String, String, bool) {
        (self.path.clone(), self.model.clone(), self.stream)
    }

    /// Differences between this expectation and a record (empty: it matches).
    fn mismatches(&self, r: &Value) -> Vec<String> {
        let mut bad = Vec::new();
        let mut check = |ok: bool, what: String| {
            if !ok {
                bad.push(what);
            }
        };
        check(r["api"] == self.api, format!("api {} != {}", r["api"], self.api));
        check(
            r["status"].as_u64() == Some(u64::from(self.status)),
            format!("status {} != {}", r["status"], self.status),
        );
        check(
            self.input_tokens.matches(&r["input_tokens"]),
            format!("input_tokens {} != {:?}", r["input_tokens"], self.input_tokens),
        );
        check(
            self.output_tokens.matches(&r["output_tokens"]),
            format!("output_tokens {} != {:?}", r["output_tokens"], self.output_tokens),
        );
        if let Some(f) = self.finish_reason {
            check(r["finish_reason"] == f, format!("finish_reason {} != {f}", r["finish_reason"]));
        }
        let rm = &r["response_model"];
        if self.status == 200 {
            check(
                rm.is_null() || *rm == *self.model,
                format!("response_model {rm} != {} (the mock echoes it)", self.model),
            );
        }
        let req_bytes = r["request_bytes"].as_u64().unwrap_or(0);
        check(
            req_bytes >= self.request_body_len as u64,
            format!("request_bytes {req_bytes} < body length {}", self.request_body_len),
        );
        bad
    }
}

/// The expected calls for every request of a plan.
pub fn expected_calls(plan: &Plan) -> Vec<ExpectedCall> {
    plan.requests().filter_map(ExpectedCall::for_request).collect()
}

/// How a process's TLS library should be named in `tls.library`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsExpect {
    /// The system OpenSSL (`.../libssl.so.3`).
    LibSsl,
    /// OpenSSL linked into this executable (or shared object).
    Binary(PathBuf),
    /// The system GnuTLS (`.../libgnutls.so.30[.x.y.z]`), hooks `gnutls_record_*`.
    GnuTls,
    /// Go's crypto/tls in this Go executable, hooks `crypto/tls.(*Conn).Write`/`Read`.
    Go(PathBuf),
    /// BoringSSL in this shared library, hooks `SSL_write`/`SSL_read`.
    BoringSsl(PathBuf),
}

/// A process the agent should name (caller or server).
#[derive(Clone, Debug)]
pub struct Identity {
    pub pid: u32,
    pub comm: String,
    pub exe: PathBuf,
    pub tls: TlsExpect,
    /// All its TLS calls come from the main thread (tid == pid).
    pub single_thread: bool,
}

impl Identity {
    fn check(&self, who: &str, p: &Value, bad: &mut Vec<String>) {
        let mut check = |ok: bool, what: String| {
            if !ok {
                bad.push(format!("{who}: {what}"));
            }
        };
        check(p["pid"].as_u64() == Some(u64::from(self.pid)), format!("pid {} != {}", p["pid"], self.pid));
        check(p["comm"] == *self.comm, format!("comm {} != {:?}", p["comm"], self.comm));
        check(p["exe"] == *self.exe.to_string_lossy(), format!("exe {} != {:?}", p["exe"], self.exe));
        check(p["uid"].as_u64() == Some(u64::from(nix::unistd::geteuid().as_raw())), format!("uid {}", p["uid"]));
        check(p["tid"].as_u64().is_some(), format!("tid {} is not a number", p["tid"]));
        if self.single_thread {
            check(p["tid"] == p["pid"], format!("tid {} != pid {} (single-threaded client)", p["tid"], p["pid"]));
        }
        check(p["cgroup"].is_string(), format!("cgroup {} is not a string", p["cgroup"]));
        let lib = p["tls"]["library"].as_str().unwrap_or_default();
        let (stack, write, read) = match &self.tls {
            TlsExpect::LibSsl => {
                check(lib.ends_with("/libssl.so.3"), format!("tls.library {lib:?} is not libssl.so.3"));
                ("openssl", "SSL_write", "SSL_read")
            }
            TlsExpect::Binary(exe) => {
                check(lib == exe.to_string_lossy(), format!("tls.library {lib:?} != {exe:?}"));
                ("openssl", "SSL_write", "SSL_read")
            }
            TlsExpect::GnuTls => {
                check(lib.contains("/libgnutls.so.30"), format!("tls.library {lib:?} is not libgnutls.so.30"));
                ("gnutls", "gnutls_record_send", "gnutls_record_recv")
            }
            TlsExpect::Go(exe) => {
                check(lib == exe.to_string_lossy(), format!("tls.library {lib:?} != {exe:?}"));
                ("go-crypto/tls", "crypto/tls.(*Conn).Write", "crypto/tls.(*Conn).Read")
            }
            TlsExpect::BoringSsl(so) => {
                check(lib == so.to_string_lossy(), format!("tls.library {lib:?} != {so:?}"));
                ("boringssl", "SSL_write", "SSL_read")
            }
        };
        check(p["tls"]["stack"] == stack, format!("tls.stack {} != {stack:?}", p["tls"]["stack"]));
        let hooks: Vec<&str> =
            p["tls"]["hooks"].as_array().map(|h| h.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        check(
            hooks.iter().any(|h| h.starts_with(write)) && hooks.iter().any(|h| h.starts_with(read)),
            format!("tls.hooks {} lacks {write}*/{read}*", p["tls"]["hooks"]),
        );
    }
}

/// Checks common to every record: shape, ids, timing, who called whom.
fn check_common(r: &Value, host: &str, client: &Identity, server: &Identity, bad: &mut Vec<String>) {
    let mut check = |ok: bool, what: String| {
        if !ok {
            bad.push(what);
        }
    };
    check(r["type"] == "llm_call", format!("type {}", r["type"]));
    let id = r["call_id"].as_str().unwrap_or_default();
    check(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        format!("call_id {:?} is not 16 hex digits", id),
    );
    let t = r["time"].as_str().unwrap_or_default().as_bytes();
    check(
        t.len() >= 20
            && t[4] == b'-'
            && t[7] == b'-'
            && t[10] == b'T'
            && t[13] == b':'
            && t[16] == b':'
            && t.ends_with(b"Z"),
        format!("time {} is not RFC 3339 UTC", r["time"]),
    );
    check(r["provider"].as_str().is_some_and(|p| !p.is_empty()), format!("provider {}", r["provider"]));
    check(r["host"] == host, format!("host {} != {host}", r["host"]));
    check(r["method"] == "POST", format!("method {}", r["method"]));
    check(r["complete"] == true, format!("complete {}", r["complete"]));
    check(r["notes"].is_array(), format!("notes {} is not an array", r["notes"]));
    check(r["side"] == "client", format!("side {} (the caller ran on this host)", r["side"]));
    let (ttfb, latency) = (r["ttfb_ms"].as_f64(), r["latency_ms"].as_f64());
    check(
        matches!((ttfb, latency), (Some(a), Some(b)) if a >= 0.0 && a <= b && b < 60_000.0),
        format!("ttfb_ms {} / latency_ms {}", r["ttfb_ms"], r["latency_ms"]),
    );
    check(r["response_bytes"].as_u64().is_some_and(|n| n > 0), format!("response_bytes {}", r["response_bytes"]));
    client.check("caller", r, bad);
    if r["server"].is_object() {
        server.check("server", &r["server"], bad);
    } else {
        bad.push(format!("server {} (the mock provider ran on this host)", r["server"]));
    }
}

fn describe(r: &Value) -> String {
    format!("{} {} model={} stream={}", r["api"], r["path"], r["model"], r["stream"])
}

fn record_key(r: &Value) -> (String, String, bool) {
    let path = r["path"].as_str().unwrap_or_default();
    (
        path.split('?').next().unwrap_or_default().to_string(),
        r["model"].as_str().unwrap_or_default().to_string(),
        r["stream"].as_bool().unwrap_or(false),
    )
}

/// Problems with `records` as the report of exactly the calls `expected`, made by `client`
/// to `server` at `host` (empty: all good). Records of other hosts/processes are ignored.
pub fn check_calls(
    records: &[Value],
    expected: &[ExpectedCall],
    host: &str,
    client: &Identity,
    server: &Identity,
) -> Vec<String> {
    let ours: Vec<&Value> = records
        .iter()
        .filter(|r| {
            r["host"] == host
                || r["pid"].as_u64() == Some(u64::from(client.pid))
                || r["pid"].as_u64() == Some(u64::from(server.pid))
                || r["server"]["pid"].as_u64() == Some(u64::from(server.pid))
        })
        .collect();
    let mut bad = Vec::new();
    if ours.len() != expected.len() {
        bad.push(format!("{} records for {} calls made", ours.len(), expected.len()));
    }
    let mut ids = HashSet::new();
    for r in &ours {
        let mut problems = Vec::new();
        check_common(r, host, client, server, &mut problems);
        if !ids.insert(r["call_id"].to_string()) {
            problems.push(format!("duplicate call_id {}", r["call_id"]));
        }
        bad.extend(problems.into_iter().map(|p| format!("[{}] {p}", describe(r))));
    }
    // Pair each expectation with an unused record of the same (path, model, stream) that
    // matches in full; report the differences from the closest one otherwise.
    let mut used = vec![false; ours.len()];
    for e in expected {
        let same_key: Vec<usize> = (0..ours.len()).filter(|&i| !used[i] && record_key(ours[i]) == e.key()).collect();
        if let Some(&i) = same_key.iter().find(|&&i| e.mismatches(ours[i]).is_empty()) {
            used[i] = true;
        } else if let Some(&i) = same_key.first() {
            used[i] = true;
            for m in e.mismatches(ours[i]) {
                bad.push(format!("[{} {} model={} stream={}] {m}", e.api, e.path, e.model, e.stream));
            }
        } else {
            bad.push(format!("missing: {} {} model={} stream={}", e.api, e.path, e.model, e.stream));
        }
    }
    for (i, r) in ours.iter().enumerate() {
        if !used[i] {
            bad.push(format!("unexpected record: {}", describe(r)));
        }
    }
    bad
}

/// Panics listing every problem, the expected calls, the records, and `context` (agent logs).
pub fn assert_calls(
    records: &[Value],
    expected: &[ExpectedCall],
    host: &str,
    client: &Identity,
    server: &Identity,
    context: &str,
) {
    let bad = check_calls(records, expected, host, client, server);
    if bad.is_empty() {
        return;
    }
    let mut by_key: BTreeMap<(String, String, bool), usize> = BTreeMap::new();
    for e in expected {
        *by_key.entry(e.key()).or_default() += 1;
    }
    let lines: Vec<String> = records.iter().map(|r| r.to_string()).collect();
    panic!(
        "agent records do not match the calls made by {} (pid {}):\n  - {}\n\nexpected (path, model, stream) x count: {by_key:?}\n\nrecords:\n{}\n{context}",
        client.comm,
        client.pid,
        bad.join("\n  - "),
        lines.join("\n")
    );
}

/// Panics if the raw agent output contains any of `secrets`.
pub fn assert_no_secrets(raw: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!raw.contains(s), "agent output contains the secret {s:?}:\n{raw}");
    }
}
