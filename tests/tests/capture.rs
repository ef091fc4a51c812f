//! Real-kernel tests: the agent attaches to OpenSSL, real clients call the TLS mock
//! provider, and the agent must report exactly the model API calls made — right numbers,
//! right processes on both ends, no credentials, nothing for ordinary requests.
//!
//! Needs root and a built agent: `cargo build -p aegis-agent && cargo test -p aegis-tests`.
//! Tests hold `serial()`, so the default parallel test runner is safe.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use aegis_tests::{
    Agent, MockProvider, Plan, Request, TempCert, assert_calls, assert_no_secrets,
    clients::{CClient, ClientRun, go_capture_toml, run_c_client, run_c_client_after, run_go, run_wget, wget_identity},
    expected_calls,
    plans::{self, SECRETS},
    require_root, run_curl, run_node, run_python, serial,
};
use serde_json::Value;

/// How long the agent may take to write the records of a finished client run.
const RECORD_WAIT: Duration = Duration::from_secs(30);

/// The running pieces of one test: agent first (so it sees every connection from its
/// start), then the mock provider.
struct Setup {
    agent: Agent,
    mock: MockProvider,
    _cert: TempCert,
}

impl Setup {
    fn start() -> Self {
        Self::start_with("")
    }

    /// [`Setup::start`] with `extra_toml` added to the agent's config.
    fn start_with(extra_toml: &str) -> Self {
        require_root();
        let cert = TempCert::generate();
        let agent = Agent::start_with_config(extra_toml);
        let mock = MockProvider::start(&cert);
        Self { agent, mock, _cert: cert }
    }

    /// Runs `client` over `plan`, waits for the agent's records, stops the agent, and
    /// asserts the records are exactly the model calls of `plan` — and hold no secret.
    /// Returns the client run and all records.
    fn run_and_check(&mut self, client: fn(u16, &Plan) -> ClientRun, plan: &Plan) -> (ClientRun, Vec<Value>) {
        let run = client(self.mock.port, plan);
        run.assert_responses(plan);
        let expected = expected_calls(plan);
        let (host, pid) = (self.mock.host(), u64::from(run.pid()));
        // Don't fail here on a timeout: the comparison below says what is wrong.
        self.agent.wait_until(|r| r["host"] == host || r["pid"].as_u64() == Some(pid), expected.len(), RECORD_WAIT);
        let records = self.agent.stop();
        let context = format!("{}\n--- mock stderr ---\n{}", self.agent.logs(), self.mock.stderr_tail());
        assert_calls(&records, &expected, &host, &run.identity, &self.mock.identity(), &context);
        assert_no_secrets(&self.agent.raw_output(), &SECRETS);
        (run, records)
    }
}

#[test]
fn curl_calls_are_reported_exactly() {
    let _serial = serial();
    let plan = Plan::single(plans::common_requests());
    Setup::start().run_and_check(run_curl, &plan);
}

#[test]
fn python_calls_are_reported_exactly() {
    let _serial = serial();
    let mut requests = plans::common_requests();
    requests.extend(plans::more_api_requests());
    let plan = Plan::single(requests);
    Setup::start().run_and_check(run_python, &plan);
}

#[test]
fn node_calls_are_reported_exactly() {
    let _serial = serial();
    let plan = Plan::single(plans::common_requests());
    Setup::start().run_and_check(run_node, &plan);
}

/// An OpenAI stream without `stream_options.include_usage` carries no usage: the tokens
/// must be null, not guessed, and the call still complete.
#[test]
fn stream_without_usage_reports_null_tokens() {
    let _serial = serial();
    let plan = Plan::single(vec![
        plans::openai_chat_stream("gpt-4o-mini", "Stream without usage, please.", false),
        plans::health(),
        Request::post(
            "/v1/completions",
            serde_json::json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Hi", "stream": true}),
        ),
    ]);
    let (_, records) = Setup::start().run_and_check(run_curl, &plan);
    for r in &records {
        assert!(r["input_tokens"].is_null() && r["output_tokens"].is_null(), "tokens must be null: {r}");
    }
}

/// wget speaks TLS through GnuTLS (`gnutls_record_send`/`recv`): its calls are reported like
/// OpenSSL clients' ones, with `tls.stack = "gnutls"` and GnuTLS's functions as hooks. One
/// process per request (wget sends one body to every URL): plain and streamed OpenAI chat,
/// and an Anthropic message; and an ordinary GET that must not be reported.
#[test]
fn wget_gnutls_calls_are_reported_exactly() {
    let _serial = serial();
    let mut setup = Setup::start();
    let plans = [
        Plan::single(vec![plans::openai_chat("gpt-4o-mini", "Which TLS library does wget use?")]),
        Plan::single(vec![plans::openai_chat_stream("gpt-4o", "Stream a haiku about GnuTLS.", true)]),
        Plan::single(vec![plans::anthropic_messages("claude-3-5-haiku-latest", "Name a GNU tool.", false)]),
        Plan::single(vec![plans::health()]),
    ];
    let runs: Vec<(u32, String)> = plans.iter().map(|p| run_wget(setup.mock.port, p)).collect();
    for (i, (_, body)) in runs.iter().enumerate().take(3) {
        assert!(body.contains("mock"), "wget got no mock answer to request {i}: {body:?}");
    }
    let pids: Vec<u64> = runs.iter().map(|(pid, _)| u64::from(*pid)).collect();
    setup.agent.wait_until(|r| r["pid"].as_u64().is_some_and(|p| pids.contains(&p)), 3, RECORD_WAIT);
    let records = setup.agent.stop();
    let context = format!("{}\n--- mock stderr ---\n{}", setup.agent.logs(), setup.mock.stderr_tail());
    for ((pid, _), plan) in runs.iter().zip(&plans) {
        let mine: Vec<Value> = records.iter().filter(|r| r["pid"].as_u64() == Some(u64::from(*pid))).cloned().collect();
        let expected = expected_calls(plan);
        assert_calls(&mine, &expected, &setup.mock.host(), &wget_identity(*pid), &setup.mock.identity(), &context);
    }
    assert_no_secrets(&setup.agent.raw_output(), &SECRETS);
}

/// A C client over BoringSSL (Debian's android-libboringssl: `SSL_*` exported by a shared
/// library in a directory discovery does not search, found in the process's maps), the
/// same client with OpenSSL linked in statically (`SSL_*` only in the executable's static
/// symbol table, exported by nothing), and the same as a shared object loaded by python
/// (OpenSSL compiled in, only its entry point exported: a Python extension module carrying
/// a TLS copy): each is found by discovery's rescan while a first process runs, then its
/// calls are reported exactly, with `tls.stack` "boringssl" and the library, or "openssl"
/// and the file that carries it. One process per request (the client sends one request
/// and reads to the close): plain and streamed OpenAI chat, an Anthropic message, and an
/// ordinary GET that must not be reported.
#[test]
fn boringssl_and_static_openssl_calls_are_reported_exactly() {
    let _serial = serial();
    let mut setup = Setup::start_with("[capture]\nrediscover_secs = 1\n");
    // A first process of each, staying 5 s after a call that is not a model call, until
    // the rescan has probed what it runs.
    let clients = [CClient::BoringSsl, CClient::StaticOpenSsl, CClient::PythonModule];
    let lingering: Vec<_> = clients
        .map(|client| {
            let port = setup.mock.port;
            std::thread::spawn(move || run_c_client(client, port, &Plan::single(vec![plans::health()]), 5000))
        })
        .into();
    let wanted = [
        aegis_tests::clients::BORINGSSL_LIB.to_owned(),
        CClient::StaticOpenSsl.path().display().to_string(),
        CClient::PythonModule.path().display().to_string(),
    ];
    let deadline = std::time::Instant::now() + aegis_tests::scaled(Duration::from_secs(15));
    let probed = |logs: &str| wanted.iter().all(|p| logs.contains(&format!("TLS probes attached path={p} ")));
    while !probed(&setup.agent.logs()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(probed(&setup.agent.logs()), "not probed within 15 s: {wanted:?}\n{}", setup.agent.logs());
    for t in lingering {
        t.join().expect("lingering client");
    }
    let plans = [
        Plan::single(vec![plans::openai_chat("gpt-4o-mini", "Which TLS library does this client use?")]),
        Plan::single(vec![plans::openai_chat_stream("gpt-4o", "Stream a haiku about BoringSSL.", true)]),
        Plan::single(vec![plans::anthropic_messages("claude-3-5-haiku-latest", "Name a static linker.", false)]),
        Plan::single(vec![plans::health()]),
    ];
    let mut runs = Vec::new();
    for client in clients {
        for (i, plan) in plans.iter().enumerate() {
            // Staying 300 ms, as a caller that exits at once may be gone before /proc is read.
            let (pid, response) = run_c_client(client, setup.mock.port, plan, 300);
            assert!(response.starts_with("HTTP/1.1 200"), "{client:?} got no answer to request {i}: {response:?}");
            runs.push((client, pid, plan));
        }
    }
    let pids: Vec<u64> = runs.iter().map(|(_, pid, _)| u64::from(*pid)).collect();
    setup.agent.wait_until(|r| r["pid"].as_u64().is_some_and(|p| pids.contains(&p)), 9, RECORD_WAIT);
    let records = setup.agent.stop();
    let context = format!("{}\n--- mock stderr ---\n{}", setup.agent.logs(), setup.mock.stderr_tail());
    for (client, pid, plan) in &runs {
        let mine: Vec<Value> = records.iter().filter(|r| r["pid"].as_u64() == Some(u64::from(*pid))).cloned().collect();
        let expected = expected_calls(plan);
        assert_calls(&mine, &expected, &setup.mock.host(), &client.identity(*pid), &setup.mock.identity(), &context);
    }
    assert_no_secrets(&setup.agent.raw_output(), &SECRETS);
}

/// A program carrying its own TLS, started after the agent, is probed from its start: with
/// discovery's periodic scan out of the way (`rediscover_secs` of an hour), the kernel's
/// process events hand its executable to discovery at its exec. The C client with OpenSSL
/// linked in connects 300 ms after its start (a service's start-up), and its call must be
/// recorded exactly.
#[test]
fn a_program_started_after_the_agent_is_probed_from_its_exec() {
    let _serial = serial();
    let mut setup = Setup::start_with("[capture]\nrediscover_secs = 3600\n");
    let plan = Plan::single(vec![plans::openai_chat("gpt-4o-mini", "Am I probed from my start?")]);
    let (pid, response) = run_c_client_after(CClient::StaticOpenSsl, setup.mock.port, &plan, 300, 300);
    assert!(response.starts_with("HTTP/1.1 200"), "no answer: {response:?}");
    setup.agent.wait_until(|r| r["pid"].as_u64() == Some(u64::from(pid)), 1, RECORD_WAIT);
    let records = setup.agent.stop();
    let context = format!("{}\n--- mock stderr ---\n{}", setup.agent.logs(), setup.mock.stderr_tail());
    let mine: Vec<Value> = records.iter().filter(|r| r["pid"].as_u64() == Some(u64::from(pid))).cloned().collect();
    let identity = CClient::StaticOpenSsl.identity(pid);
    assert_calls(&mine, &expected_calls(&plan), &setup.mock.host(), &identity, &setup.mock.identity(), &context);
}

/// A Go client (net/http over Go's own crypto/tls, HTTP/1.1, no C library at all): its calls
/// are reported like OpenSSL clients' ones, with `tls.stack = "go-crypto/tls"` and the Go
/// functions as hooks. Reads and writes are seen at the RET instructions of
/// `(*Conn).Read`/`Write`, keyed by goroutine; the goroutines move between threads.
#[test]
fn go_calls_are_reported_exactly() {
    let _serial = serial();
    let plan = Plan::single(plans::common_requests());
    Setup::start_with(&go_capture_toml()).run_and_check(|port, plan| run_go(port, plan, false), &plan);
}

/// The same client built with `-ldflags=-s -w` (no ELF symbol table, no DWARF): its
/// crypto/tls is found through Go's own symbol table. Two connections at once, from two
/// goroutines.
#[test]
fn stripped_go_calls_are_reported_exactly() {
    let _serial = serial();
    let plan = Plan {
        connections: vec![
            vec![
                plans::openai_chat("gpt-4o-mini", "Is a stripped Go binary still seen?"),
                plans::health(),
                plans::anthropic_messages("claude-3-5-haiku-latest", "Name a Go proverb.", true),
            ],
            vec![
                plans::openai_chat_stream("gpt-4o", "Stream a haiku about goroutines.", true),
                plans::openai_chat("gpt-4.1-nano", "Reply with a compressed body.").gzip(),
            ],
        ],
    };
    Setup::start_with(&go_capture_toml()).run_and_check(|port, plan| run_go(port, plan, true), &plan);
}

/// Error answers are still calls: reported with their status and no usage.
#[test]
fn error_status_is_reported() {
    let _serial = serial();
    let plan = Plan::single(vec![
        plans::openai_chat("gpt-4o-mini", "This one is rate limited.").header("x-mock-status", "429"),
        plans::health(),
        plans::anthropic_messages("claude-3-5-haiku-latest", "And this one fails.", false)
            .header("x-mock-status", "500"),
        plans::openai_chat("gpt-4o-mini", "This one succeeds."),
    ]);
    Setup::start().run_and_check(run_python, &plan);
}

/// 8 threads x 5 calls, one connection per thread, in one python process: every record
/// must carry its own thread's model, prompt size and thread id — nothing mixed up.
#[test]
fn concurrent_python_threads_do_not_mix() {
    let _serial = serial();
    let plan = plans::concurrent_plan(8, 5);
    let (run, records) = Setup::start().run_and_check(run_python, &plan);

    // Thread id of each connection, as the client saw it (threading.get_native_id()).
    let conn_tid: BTreeMap<usize, u32> =
        run.responses.iter().map(|r| (r.conn, r.tid.expect("python prints tid"))).collect();
    assert_eq!(conn_tid.values().collect::<BTreeSet<_>>().len(), 8, "8 distinct client threads: {conn_tid:?}");
    for r in &records {
        let model = r["model"].as_str().unwrap_or_default();
        let conn: usize = model.strip_prefix("mock-model-").and_then(|n| n.parse().ok()).unwrap_or(usize::MAX);
        let tid = conn_tid.get(&conn).unwrap_or_else(|| panic!("record of unknown model {model}: {r}"));
        assert_eq!(r["tid"].as_u64(), Some(u64::from(*tid)), "record of {model} names the wrong thread: {r}");
        assert_ne!(r["server"]["tid"], r["server"]["pid"], "the mock serves from handler threads: {r}");
    }
}

/// Runs the `tls_loop` benchmark binary to completion; returns its pid.
fn run_tls_loop(args: &[&str]) -> u32 {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tls_loop"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawning tls_loop");
    let pid = child.id();
    let status = aegis_tests::wait_with_timeout(&mut child, "tls_loop", Duration::from_secs(60));
    assert!(status.success(), "tls_loop {args:?} failed: {status}");
    pid
}

/// The benchmark's traffic (client and server threads of ONE process, openssl crate over
/// the system libssl): one record per chat call naming that process at both ends, none
/// for its /health traffic.
#[test]
fn tls_loop_calls_are_reported_once_with_both_ends() {
    let _serial = serial();
    require_root();
    let mut agent = Agent::start();
    let health_pid = run_tls_loop(&["--requests", "30", "--connections", "2", "--path", "/health"]);
    let llm_pid = run_tls_loop(&["--requests", "20", "--connections", "2"]);
    agent.wait_until(|r| r["pid"].as_u64() == Some(u64::from(llm_pid)), 20, RECORD_WAIT);
    let records = agent.stop();
    let pids = [u64::from(health_pid), u64::from(llm_pid)];
    let ours: Vec<&Value> = records
        .iter()
        .filter(|r| {
            r["pid"].as_u64().is_some_and(|p| pids.contains(&p))
                || r["server"]["pid"].as_u64().is_some_and(|p| pids.contains(&p))
        })
        .collect();
    let dump = || format!("{}\n{}", agent.raw_output(), agent.logs());
    let count = |side: &str, joined: bool| {
        ours.iter().filter(|r| r["side"] == side && r["server"].is_object() == joined).count()
    };
    assert_eq!(
        ours.len(),
        20,
        "20 chat calls (client and server threads of pid {llm_pid}) must give 20 records, one per call \
         naming both ends, and /health none; got {} (side=client with server: {}, side=client without \
         server: {}, side=server: {}); records:\n{}",
        ours.len(),
        count("client", true),
        count("client", false),
        count("server", false) + count("server", true),
        dump()
    );
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_tls_loop")).expect("tls_loop path");
    let mut ids = BTreeSet::new();
    for r in ours {
        let ok = r["pid"] == llm_pid
            && r["server"]["pid"] == llm_pid
            && r["exe"] == *exe.to_string_lossy()
            && r["server"]["exe"] == *exe.to_string_lossy()
            && r["tid"] != r["pid"]
            && r["server"]["tid"] != r["tid"]
            && r["api"] == "chat_completions"
            && r["model"] == "gpt-4o-mini"
            && r["response_model"] == "gpt-4o-mini-2024-07-18"
            && r["stream"] == false
            && r["status"] == 200
            && r["input_tokens"] == 142
            && r["output_tokens"] == 118
            && r["finish_reason"] == "stop"
            && r["side"] == "client"
            && r["complete"] == true;
        assert!(ok, "wrong record for tls_loop (pid {llm_pid}, exe {exe:?}): {r}\n{}", dump());
        assert!(ids.insert(r["call_id"].to_string()), "duplicate call_id: {r}");
    }
    assert_no_secrets(&agent.raw_output(), &["sk-tls-loop-benchmark"]);
}
