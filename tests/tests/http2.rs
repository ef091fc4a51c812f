//! HTTP/2 over TLS on the real kernel: `curl --http2` (OpenSSL + nghttp2) and node's `http2`
//! client send several concurrent streams on one connection to an HTTP/2-only TLS mock
//! provider (node, its own OpenSSL: the agent sees that end too). The agent must report
//! exactly the calls made, one per stream, with their models, tokens, statuses and stream
//! ids, joined with the serving end; and a model block must stop an h2 stream in enforce
//! mode, saying that its connection (and the other stream on it) went with it.
//!
//! Needs root and a built agent: `cargo build -p aegis-agent && cargo test -p aegis-tests
//! --test http2`. Tests hold `serial()`.

use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    time::Duration,
};

use aegis_tests::{
    Agent, ContainConfig, PinDir, Plan, Request, TempCert, TestCgroup, clients, file_tail,
    http2::{self, H2Call, MockH2Provider},
    require_root, serial,
};
use serde_json::Value;

const RECORD_WAIT: Duration = Duration::from_secs(30);

/// Runs `cmd` to its end; panics with its output unless it succeeded.
fn run_ok(mut cmd: Command, what: &str) -> (u32, String) {
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    let pid = child.id();
    let out = child.wait_with_output().expect("waiting for the client");
    assert!(out.status.success(), "{what} failed: {}", http2::describe(&out));
    (pid, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The agent's records of `calls` made by process `pid` over HTTP/2 to `mock` are exactly
/// those calls: one per stream, on distinct odd streams of one connection, joined with the
/// mock's end, with the mock's tokens and statuses; nothing for `/health`.
fn assert_h2_calls(agent: &mut Agent, mock: &MockH2Provider, pid: u32, calls: &[H2Call]) {
    let pid64 = u64::from(pid);
    let mine = |r: &Value| r["type"] == "llm_call" && (r["pid"].as_u64() == Some(pid64));
    agent.wait_until(mine, calls.len(), RECORD_WAIT);
    let all = agent.stop();
    let context = format!("{}\n--- mock stderr ---\n{}", agent.logs(), mock.stderr_tail());
    let host = mock.host();
    let to_mock: Vec<&Value> = all.iter().filter(|r| r["type"] == "llm_call" && r["host"] == host.as_str()).collect();
    assert_eq!(to_mock.len(), calls.len(), "one record per call, none alone: {to_mock:#?}{context}");
    let mut streams = BTreeSet::new();
    for call in calls {
        let r = to_mock
            .iter()
            .find(|r| r["model"] == call.model.as_str())
            .unwrap_or_else(|| panic!("no record of {}: {to_mock:#?}{context}", call.model));
        let (input, output) = call.tokens();
        let what = format!("{}: {r:#}{context}", call.model);
        assert_eq!(r["pid"].as_u64(), Some(pid64), "{what}");
        assert_eq!(r["http_version"], "2", "{what}");
        assert_eq!((r["method"].as_str(), r["path"].as_str()), (Some("POST"), Some("/v1/chat/completions")), "{what}");
        assert_eq!(r["api"], "chat_completions", "{what}");
        assert_eq!(r["status"].as_u64(), Some(call.status()), "{what}");
        assert_eq!((r["input_tokens"].as_u64(), r["output_tokens"].as_u64()), (input, output), "{what}");
        assert_eq!(r["stream"].as_bool(), Some(call.stream), "{what}");
        assert_eq!(r["complete"], true, "{what}");
        assert_eq!(r["side"], "client", "{what}");
        assert_eq!(r["server"]["pid"].as_u64(), Some(u64::from(mock.pid())), "joined with the serving end: {what}");
        let stream = r["stream_id"].as_u64().unwrap_or_else(|| panic!("no stream_id: {what}"));
        assert!(stream % 2 == 1 && streams.insert(stream), "distinct client streams: {what}");
        assert!(!r.to_string().contains("sk-h2-secret"), "no credential in a record: {what}");
    }
}

fn calls() -> Vec<H2Call> {
    vec![
        H2Call::chat("h2-model-json", "Name three rivers.").header("authorization", "Bearer sk-h2-secret-1"),
        H2Call::streamed("h2-model-sse", "Stream me a haiku about TLS.", true),
        H2Call::streamed("h2-model-sse-nousage", "Stream without usage.", false),
        H2Call::chat("h2-model-limited", "This one is rate limited.").header("x-mock-status", "429"),
    ]
}

#[test]
fn curl_http2_streams_are_reported_exactly() {
    let _serial = serial();
    require_root();
    let cert = TempCert::generate();
    let mut agent = Agent::start();
    let mock = MockH2Provider::start(&cert);
    let calls = calls();
    let (pid, stdout) = run_ok(http2::curl_command(mock.port, &calls), "curl --http2");
    // Every answer came over HTTP/2, with the mock's status.
    let mut want: Vec<String> = calls.iter().map(|c| format!("2 {}", c.status())).collect();
    want.push("2 200".into());
    let mut got: Vec<String> = stdout.lines().map(str::to_owned).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want, "curl's answers");
    assert_h2_calls(&mut agent, &mock, pid, &calls);
}

#[test]
fn node_http2_streams_are_reported_exactly() {
    let _serial = serial();
    require_root();
    let cert = TempCert::generate();
    let mut agent = Agent::start();
    let mock = MockH2Provider::start(&cert);
    let calls = calls();
    let (pid, stdout) = run_ok(http2::node_command(mock.port, &calls), "node http2 client");
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    let streams: BTreeSet<u64> = lines.iter().filter_map(|l| l["stream"].as_u64()).collect();
    assert_eq!(streams.len(), calls.len() + 1, "one stream per request on one session: {lines:#?}");
    assert_h2_calls(&mut agent, &mock, pid, &calls);
}

/// A Go client (Go's bundled HTTP/2 over Go's crypto/tls, ALPN h2): a `GET /health` opens
/// the connection, then the calls go at once as concurrent streams on it, each written by
/// its own goroutine and read by the connection's reader goroutine.
#[test]
fn go_http2_streams_are_reported_exactly() {
    let _serial = serial();
    require_root();
    let cert = TempCert::generate();
    let mut agent = Agent::start_with_config(&clients::go_capture_toml());
    let mock = MockH2Provider::start(&cert);
    let calls = calls();
    let mut requests = vec![Request::get("/health")];
    requests.extend(
        calls.iter().map(|c| {
            c.headers.iter().fold(Request::post("/v1/chat/completions", c.body()), |r, (n, v)| r.header(n, v))
        }),
    );
    let (_dir, mut cmd) = clients::go_command(mock.port, &Plan::single(requests), false, true);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let (pid, stdout) = run_ok(cmd, "go http2 client");
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), calls.len() + 1, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["proto"], "HTTP/2.0", "every answer over HTTP/2: {lines:#?}");
        let i = l["i"].as_u64().expect("i") as usize;
        let want = if i == 0 { 200 } else { calls[i - 1].status() };
        assert_eq!(l["status"].as_u64(), Some(want), "{lines:#?}");
    }
    assert_h2_calls(&mut agent, &mock, pid, &calls);
}

/// `disable model M` in enforce mode stops an h2 stream asking for M: the connection is
/// destroyed before the (held back) answer, the record says so and how many other streams
/// went with it, and the other stream's record names the stream that ended it.
#[test]
fn a_model_block_stops_an_http2_stream_and_says_the_connection_went() {
    let _serial = serial();
    require_root();
    let cert = TempCert::generate();
    let cg = TestCgroup::new("h2-model");
    let pins = PinDir::new("h2-model");
    let mock = MockH2Provider::start(&cert);
    let cfg = ContainConfig::new(&cg, &pins).fail_open();
    let agent = cfg.start_agent();
    let context = || {
        format!(
            "{}\n--- records ---\n{}\n--- mock ---\n{}",
            agent.logs(),
            file_tail(agent.output_path(), 6000),
            mock.stderr_tail()
        )
    };
    let model = format!("it-h2-disabled-{}", std::process::id());
    cfg.ctl_ok(&["disable", "model", &model, "--reason", "it: h2 model disabled", "--expires", "10m"]);
    let calls = vec![
        H2Call::chat("it-h2-allowed", "An allowed call on the same connection.").header("x-mock-delay-ms", "1500"),
        H2Call::chat(&model, "What is the capital of France?").header("x-mock-delay-ms", "1500"),
    ];
    // node's client, which does not retry: after the kill, curl sometimes (likely) sent the allowed
    // call again on a new connection, where it was answered (2 runs in 6).
    let mut cmd = http2::node_command(mock.port, &calls);
    cg.enter(&mut cmd);
    let child = cmd.spawn().expect("spawning the node http2 client");
    let pid = u64::from(child.id());
    let out = child.wait_with_output().expect("waiting for the node http2 client");
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    // Both model calls are held back by the mock (1.5 s): neither may be answered. /health
    // (the last request) may or may not be answered before the kill.
    let answered_calls =
        lines.iter().filter(|l| l["i"].as_u64().is_some_and(|i| i < calls.len() as u64) && l["status"] == 200).count();
    assert_eq!(answered_calls, 0, "no model call answered: {}{}", http2::describe(&out), context());
    let records = agent.wait_for_records(|r| r["type"] == "llm_call" && r["pid"].as_u64() == Some(pid), 2, RECORD_WAIT);
    let find =
        |m: &str| records.iter().find(|r| r["model"] == m).unwrap_or_else(|| panic!("no record of {m}{}", context()));
    let stopped = find(&model);
    let what = format!("{stopped:#}{}", context());
    let e = &stopped["enforcement"];
    assert_eq!(e["outcome"], "connection_killed", "{what}");
    assert!(e["by"].as_str().is_some_and(|b| b.starts_with("operator:")), "{what}");
    assert_eq!(e["bytes_in_after_verdict"], 0, "the answer was held back: {what}");
    assert_eq!(stopped["http_version"], "2", "{what}");
    assert_eq!(stopped["decision"]["action"], "block", "{what}");
    let notes: Vec<&str> = stopped["notes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    // The allowed call's stream, and /health's when its answer had not come yet.
    assert!(
        notes.iter().any(|n| matches!(
            *n,
            "http2_connection_killed:other_streams=1" | "http2_connection_killed:other_streams=2"
        )),
        "{what}"
    );
    let other = find("it-h2-allowed");
    let what = format!("{other:#}{}", context());
    assert!(other["enforcement"].is_null(), "{what}");
    assert_eq!(other["complete"], false, "{what}");
    let stream = stopped["stream_id"].as_u64().expect("stream id");
    let note = format!("http2_connection_killed_for_stream:{stream}");
    assert!(other["notes"].as_array().into_iter().flatten().any(|n| n == note.as_str()), "{what}");
}
