//! The blind-spot report on the real kernel: a process that talks to a model endpoint
//! through a TLS stack capture does not hook (rustls, compiled into a small Rust program of
//! this crate; OpenSSL linked into a stripped C program) is reported with its process,
//! destination and likely reason; an OpenSSL
//! client (curl) to the same endpoint, whose plaintext capture sees, is not; and the same
//! rustls client talking to a port no provider lists is not either.
//!
//! The mock provider is made a model endpoint by the config (`[providers.mock]` on
//! 127.0.0.1 and its port). Traffic stays on loopback.
//!
//! A ClientHello's server name (SNI) names a model endpoint too: a provider known only by a
//! wildcard host (`[providers.sni]`, `*.aegis-sni.invalid`, which resolves nowhere) is
//! followed at whatever address the client connects to.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use aegis_tests::{
    Agent, ContainConfig, MockProvider, PinDir, Plan, TempCert, TestCgroup,
    clients::{CClient, run_c_client},
    contain::Provider,
    plans, require_root, run_curl, scaled, serial,
};
use serde_json::Value;

const GRACE_MS: u64 = 1500;

/// Runs the rustls client once against 127.0.0.1:`port`, to completion; it stays a moment
/// after its call, as a service would (the agent looks at a process when its connect
/// arrives; one that is gone by then is reported without its executable).
fn run_rustls_client(port: u16) -> u32 {
    run_rustls_client_named(port, "localhost")
}

/// [`run_rustls_client`] with its ClientHello naming `server_name`; returns its pid.
fn run_rustls_client_named(port: u16, server_name: &str) -> u32 {
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"unseen by capture"}]}"#;
    let child = Command::new(env!("CARGO_BIN_EXE_rustls_client"))
        .arg(port.to_string())
        .arg("/v1/chat/completions")
        .arg(body)
        .arg("2000")
        .arg(server_name)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running rustls_client");
    let pid = child.id();
    let child = child.wait_with_output().expect("waiting for rustls_client");
    let stdout = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success() && stdout.contains("200"),
        "rustls_client failed ({}): {stdout}\n{}",
        child.status,
        String::from_utf8_lossy(&child.stderr)
    );
    pid
}

fn blind_spots(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["type"] == "blind_spot").collect()
}

/// The pieces of a report test: the mock provider made a model endpoint by the config, a
/// second TLS server that no provider lists (talking to it is nobody's business), and an
/// agent with the blind-spot report on (grace [`GRACE_MS`]).
struct Watched {
    cfg: ContainConfig,
    agent: Agent,
    mock: MockProvider,
    other: MockProvider,
    _cert: TempCert,
    _cg: TestCgroup,
    _pins: PinDir,
}

impl Watched {
    fn start(name: &str) -> Self {
        Self::start_with(name, Vec::new(), false)
    }

    /// [`Watched::start`] with more providers in the config, and the SNI watch on or off.
    fn start_with(name: &str, providers: Vec<Provider>, sni: bool) -> Self {
        require_root();
        let cert = TempCert::generate();
        let (cg, pins) = (TestCgroup::new(name), PinDir::new(name));
        let mock = MockProvider::start(&cert);
        let other = MockProvider::start_named(&cert, "not-a-provider");
        let mut cfg = ContainConfig::new(&cg, &pins).shipped_mode();
        cfg.providers.push(Provider { name: "mock".into(), hosts: vec!["127.0.0.1".into()], ports: vec![mock.port] });
        cfg.providers.extend(providers);
        cfg.extra = format!("[blind_spots]\ngrace_ms = {GRACE_MS}\nrepeat_secs = 300\nresolve_secs = 1\nsni = {sni}\n");
        let agent = cfg.start_agent();
        let status: Value = serde_json::from_str(&cfg.ctl_ok(&["status", "--json"])).expect("status JSON");
        let cap =
            status["capabilities"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "blind_spots")).cloned();
        assert_eq!(cap.as_ref().map(|c| c["state"].clone()), Some("active".into()), "{status:#}");
        // The endpoints thread resolves at start; give it a turn before the first connect.
        std::thread::sleep(Duration::from_millis(500));
        Self { cfg, agent, mock, other, _cert: cert, _cg: cg, _pins: pins }
    }

    /// Waits (20 s at most) for `n` blind spots, then past the grace of every connect (what
    /// else would be reported is by then); stops the agent. Returns its records, `status`
    /// and `status --json`.
    fn finish(&mut self, n: usize) -> (Vec<Value>, String, Value) {
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        while blind_spots(&self.agent.records()).len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_millis(GRACE_MS + 1000));
        let text = self.cfg.ctl_ok(&["status"]);
        let status: Value = serde_json::from_str(&self.cfg.ctl_ok(&["status", "--json"])).expect("status JSON");
        (self.agent.stop(), text, status)
    }
}

#[test]
fn a_rustls_client_is_reported_and_an_openssl_client_is_not() {
    let _serial = serial();
    let mut w = Watched::start("blind-spots");
    let (mock, other) = (&w.mock, &w.other);

    let curl = run_curl(mock.port, &Plan::single(vec![plans::openai_chat("gpt-4o-mini", "seen by capture")]));
    run_rustls_client(mock.port);
    run_rustls_client(mock.port);
    run_rustls_client(other.port);
    let chat = Plan::single(vec![plans::openai_chat("gpt-4o-mini", "unseen: a stripped static copy")]);
    let (stripped_pid, response) = run_c_client(CClient::StaticStripped, mock.port, &chat, 2000);
    assert!(response.starts_with("HTTP/1.1 200"), "the stripped C client got no answer: {response:?}");

    let (dest, other_dest) = (format!("127.0.0.1:{}", mock.port), format!("127.0.0.1:{}", other.port));
    let (records, text, status) = w.finish(3);
    let spots = blind_spots(&records);
    let context = format!("blind spots: {spots:#?}\n{}", w.agent.logs());

    // Two rustls processes and the stripped C client, each reported once, with the reason
    // and the destination.
    assert_eq!(spots.len(), 3, "{context}");
    let (stripped, spots): (Vec<&Value>, Vec<&Value>) =
        spots.into_iter().partition(|s| s["pid"].as_u64() == Some(u64::from(stripped_pid)));
    assert_eq!(stripped.len(), 1, "{context}");
    let s = stripped[0];
    assert_eq!(
        (&s["dest"], &s["provider"], &s["stack"]),
        (&dest.as_str().into(), &"mock".into(), &"static".into()),
        "{context}"
    );
    assert_eq!(s["exe"], CClient::StaticStripped.path().display().to_string(), "{context}");
    assert!(s["reason"].as_str().is_some_and(|r| r.contains("stripped")), "{context}");
    assert!(
        records.iter().all(|r| r["type"] != "llm_call" || r["pid"].as_u64() != Some(u64::from(stripped_pid))),
        "the stripped client's call is not seen: {context}"
    );
    for s in &spots {
        assert_eq!(s["dest"], dest.as_str(), "{context}");
        assert_eq!(s["provider"], "mock", "{context}");
        assert_eq!(s["stack"], "rustls", "{context}");
        assert_eq!(s["connects"], 1, "{context}");
        assert_eq!(s["grace_ms"], GRACE_MS, "{context}");
        assert!(s["reason"].as_str().is_some_and(|r| r.contains("rustls")), "{context}");
        assert!(s["exe"].as_str().is_some_and(|e| e.ends_with("/rustls_client")), "{context}");
        assert!(s["comm"].as_str().is_some_and(|c| c.starts_with("rustls_client")), "{context}");
    }
    assert_ne!(spots[0]["pid"], spots[1]["pid"], "{context}");
    // curl's call is captured and recorded, so its connect is explained.
    let curl_pid = u64::from(curl.pid());
    assert!(spots.iter().all(|s| s["pid"].as_u64() != Some(curl_pid)), "{context}");
    assert!(
        records.iter().any(|r| r["type"] == "llm_call" && r["pid"].as_u64() == Some(curl_pid)),
        "curl's call is recorded: {context}"
    );
    // No report names the port no provider lists.
    assert!(records.iter().all(|r| r["dest"] != other_dest.as_str()), "{context}");

    let counts = &status["capture"]["blind_spots"];
    assert_eq!(counts["connects"], 4, "curl, two rustls and a C connect to the endpoint: {status:#}");
    assert_eq!(counts["explained"], 1, "{status:#}");
    assert_eq!(counts["blind"], 3, "{status:#}");
    assert_eq!(counts["reports"], 3, "{status:#}");
    assert_eq!(counts["events_lost"], 0, "{status:#}");
    assert!(text.contains("blind spots: 4 connects"), "{text}");
    // The SNI watch is off unless asked for (every packet of the host would pay for it).
    assert!(text.contains("SNI watch: off"), "{text}");
    assert!(status["capture"]["blind_spots"]["sni"].is_null(), "{status:#}");
}

/// A python client (OpenSSL, probed) that connects to 127.0.0.1:PORT with its ClientHello
/// naming HOST, makes one call (to the end of the answer: the mock closes), prints its pid
/// and status, and keeps its socket a moment (as a service's pool does: the agent names the
/// process holding the socket; a process gone first is counted as not named).
const SNI_CALL_PY: &str = r#"
import json, os, socket, ssl, sys, time
host, port = sys.argv[1], int(sys.argv[2])
ctx = ssl._create_unverified_context()
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=host)
body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "named by SNI"}]})
s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())
response = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    response += chunk
print(os.getpid(), response.split(b" ")[1].decode(), flush=True)
time.sleep(1.0)
s.close()
"#;

/// SNI: a connection whose ClientHello names a provider is followed at an address the agent
/// does not know for it. A rustls client naming `api.aegis-sni.invalid` (a provider known only
/// by the wildcard `*.aegis-sni.invalid`) while connecting to a port no provider lists is
/// reported with the name, the provider and its process; python (OpenSSL) naming the same
/// host there is captured, so not reported; the same rustls client naming `localhost` is nobody's business;
/// and one naming the provider while connecting to the mock's known endpoint is followed
/// once, by the connect watch (not twice).
#[test]
fn a_client_hello_naming_a_provider_is_followed_at_any_address() {
    let _serial = serial();
    let sni = Provider { name: "sni".into(), hosts: vec!["*.aegis-sni.invalid".into()], ports: vec![443] };
    let mut w = Watched::start_with("blind-spots-sni", vec![sni], true);
    let host = "api.aegis-sni.invalid";
    let (mock_port, other_port) = (w.mock.port, w.other.port);
    let named_pid = run_rustls_client_named(other_port, host);
    run_rustls_client_named(other_port, "localhost");
    let at_endpoint_pid = run_rustls_client_named(mock_port, host);
    let out = Command::new("python3")
        .arg("-c")
        .arg(SNI_CALL_PY)
        .arg(host)
        .arg(other_port.to_string())
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the python client failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    let (python_pid, status_line) = stdout.trim().split_once(' ').expect("pid and status");
    assert_eq!(status_line, "200", "{stdout}");
    let python_pid: u64 = python_pid.parse().expect("a pid");

    let (records, text, status) = w.finish(2);
    let spots = blind_spots(&records);
    let context = format!("blind spots: {spots:#?}\n{text}\n{}", w.agent.logs());
    assert_eq!(spots.len(), 2, "{context}");
    let by_pid = |pid: u32| spots.iter().find(|s| s["pid"].as_u64() == Some(u64::from(pid))).copied();
    let s = by_pid(named_pid).unwrap_or_else(|| panic!("the rustls client naming {host} is reported: {context}"));
    assert_eq!(
        (&s["dest"], &s["provider"], &s["sni"], &s["stack"]),
        (&format!("127.0.0.1:{other_port}").into(), &"sni".into(), &host.into(), &"rustls".into()),
        "{context}"
    );
    let s =
        by_pid(at_endpoint_pid).unwrap_or_else(|| panic!("the client at the known endpoint is reported: {context}"));
    assert_eq!((&s["provider"], s.get("sni")), (&"mock".into(), None), "{context}");
    assert!(
        records.iter().any(|r| r["type"] == "llm_call" && r["pid"].as_u64() == Some(python_pid)),
        "python's call is recorded: {context}"
    );

    let counts = &status["capture"]["blind_spots"];
    assert_eq!(counts["connects"], 3, "python and rustls named by SNI, rustls at the endpoint: {status:#}");
    assert_eq!((&counts["explained"], &counts["blind"]), (&1.into(), &2.into()), "{status:#}");
    let sni = &counts["sni"];
    assert_eq!(sni["named"], 3, "{status:#}");
    assert_eq!(sni["unknown_address"], 2, "{status:#}");
    assert_eq!((&sni["unowned"], &sni["dropped"]), (&0.into(), &0.into()), "{status:#}");
    assert!(text.contains("SNI watch: "), "{text}");
}

/// A python process with a UDP socket connected to 127.0.0.1:PORT (as a QUIC client's is),
/// sending one datagram and staying 3 s; prints its pid.
const UDP_FLOW_PY: &str = r#"
import os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.0.1", int(sys.argv[1])))
s.send(b"\xc0QUIC initial (not really)")
print(os.getpid(), flush=True)
time.sleep(3)
"#;

/// QUIC: a UDP flow to a model endpoint (a connected socket to the mock's address and port)
/// is reported as a blind spot with the stack `quic` and its process, and `status` counts it;
/// a UDP flow to a port no provider lists is not.
#[test]
fn a_udp_flow_to_a_model_endpoint_is_reported_as_quic() {
    let _serial = serial();
    let mut w = Watched::start("blind-spots-udp");
    let run = |port: u16| {
        let out =
            Command::new("python3").arg("-c").arg(UDP_FLOW_PY).arg(port.to_string()).output().expect("running python3");
        assert!(out.status.success(), "the UDP client failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().expect("the UDP client prints its pid")
    };
    let pid = run(w.mock.port);
    run(w.other.port);
    let dest = format!("127.0.0.1:{}", w.mock.port);
    let (records, text, status) = w.finish(1);
    let spots = blind_spots(&records);
    let context = format!("blind spots: {spots:#?}\n{text}\n{}", w.agent.logs());
    assert_eq!(spots.len(), 1, "{context}");
    let s = spots[0];
    assert_eq!(s["pid"].as_u64(), Some(pid), "{context}");
    assert_eq!(s["dest"], dest, "{context}");
    assert_eq!((&s["provider"], &s["stack"]), (&"mock".into(), &"quic".into()), "{context}");
    assert!(s["reason"].as_str().is_some_and(|r| r.contains("QUIC")), "{context}");
    assert!(s["comm"].as_str().is_some_and(|c| c.starts_with("python")), "{context}");
    let counts = &status["capture"]["blind_spots"];
    assert_eq!(counts["udp_flows"], 1, "{status:#}");
    assert_eq!(counts["blind"], 1, "{status:#}");
    assert!(text.contains("1 UDP (QUIC) flows"), "{text}");
}

/// A python process that makes one call, waits, and makes another on a new connection; it
/// prints its pid first.
const TWO_CALLS_PY: &str = r#"
import http.client, json, os, ssl, sys, time
print(os.getpid(), flush=True)
ctx = ssl._create_unverified_context()
body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "scoped capture"}]})
for i in range(2):
    c = http.client.HTTPSConnection("127.0.0.1", int(sys.argv[1]), context=ctx)
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    print(r.status, flush=True)
    c.close()
    time.sleep(1.0)
"#;

/// A python process that sleeps (its start-up), makes one call on its first connection,
/// then forks a child that sleeps and makes one call on its own connection. Prints
/// "exec PID" and "fork PID" with the statuses.
const LATER_CALLS_PY: &str = r#"
import http.client, json, os, ssl, sys, time
def call(tag):
    time.sleep(0.5)
    ctx = ssl._create_unverified_context()
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": tag}]})
    c = http.client.HTTPSConnection("127.0.0.1", int(sys.argv[1]), context=ctx)
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    c.close()
    print(tag, os.getpid(), r.status, flush=True)
print("exec", os.getpid(), flush=True)
call("exec")
child = os.fork()
if child == 0:
    print("fork", os.getpid(), flush=True)
    call("fork")
    os._exit(0)
_, status = os.waitpid(child, 0)
sys.exit(status)
"#;

/// An agent with `capture.scope = "model_processes"` and the mock provider as a model
/// endpoint. Debug from the probes: the log says how long after its connect, exec or fork
/// each process got them (printed by [`print_probe_delays`]).
fn start_scoped(cg: &TestCgroup, pins: &PinDir, mock: &MockProvider) -> (ContainConfig, Agent) {
    let mut cfg = ContainConfig::new(cg, pins).shipped_mode();
    cfg.providers.push(Provider { name: "mock".into(), hosts: vec!["127.0.0.1".into()], ports: vec![mock.port] });
    cfg.extra =
        format!("[capture]\nscope = \"model_processes\"\n\n[blind_spots]\ngrace_ms = {GRACE_MS}\nresolve_secs = 1\n");
    let agent = cfg.start_agent_with_env(&[("AEGIS_LOG", "info,aegis_agent::capture::probes=debug")]);
    let status: Value = serde_json::from_str(&cfg.ctl_ok(&["status", "--json"])).expect("status JSON");
    let capture = status["capabilities"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "capture")).cloned();
    assert!(
        capture.as_ref().and_then(|c| c["detail"].as_str()).is_some_and(|d| d.contains("per process")),
        "{status:#}"
    );
    std::thread::sleep(Duration::from_millis(500));
    (cfg, agent)
}

fn print_probe_delays(logs: &str) {
    for l in logs.lines().filter(|l| l.contains("capture probes attached")) {
        eprintln!("scoped capture: {}", l.split_once("after its connect, exec or fork").map_or(l, |(_, r)| r));
    }
}

/// `capture.scope = "model_processes"`: a process that never connects to a model endpoint
/// gets no probe at all (tls_loop's model-shaped calls to its own server are not seen), and a
/// process that does is probed from its first connect: its later calls are recorded, and its
/// first one is either recorded or reported as a blind spot naming the scope, never silent.
#[test]
fn scoped_capture_probes_only_processes_that_talk_to_model_endpoints() {
    let _serial = serial();
    require_root();
    let cert = TempCert::generate();
    let cg = TestCgroup::new("scoped-capture");
    let pins = PinDir::new("scoped-capture");
    let mock = MockProvider::start(&cert);
    let (_cfg, mut agent) = start_scoped(&cg, &pins, &mock);

    // Not a model endpoint: tls_loop's own server on an ephemeral port.
    let child = Command::new(env!("CARGO_BIN_EXE_tls_loop"))
        .args(["--requests", "20", "--connections", "1", "--path", "/v1/chat/completions"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running tls_loop");
    let loop_pid = u64::from(child.id());
    let tls_loop = child.wait_with_output().expect("tls_loop's output");
    assert!(tls_loop.status.success(), "tls_loop: {}", String::from_utf8_lossy(&tls_loop.stderr));
    let py = Command::new("python3").arg("-c").arg(TWO_CALLS_PY).arg(mock.port.to_string()).output().expect("python3");
    let out = String::from_utf8_lossy(&py.stdout).into_owned();
    assert!(py.status.success(), "python: {out}{}", String::from_utf8_lossy(&py.stderr));
    let pid: u64 = out.lines().next().and_then(|l| l.trim().parse().ok()).expect("the pid line");
    assert_eq!(out.lines().filter(|l| l.trim() == "200").count(), 2, "{out}");

    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    let mine = |records: &[Value]| -> usize {
        records.iter().filter(|r| r["pid"].as_u64() == Some(pid) && r["type"] != "blind_spot").count()
    };
    while mine(&agent.records()) < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(GRACE_MS + 1000));
    let records = agent.stop();
    let context = format!("records: {records:#?}\n{}", agent.logs());
    let calls = records.iter().filter(|r| r["type"] == "llm_call" && r["pid"].as_u64() == Some(pid)).count();
    let blind: Vec<&Value> =
        records.iter().filter(|r| r["type"] == "blind_spot" && r["pid"].as_u64() == Some(pid)).collect();
    // The second call came after the probes: recorded. The first: recorded or reported.
    assert!(calls >= 1, "{context}");
    assert_eq!(
        calls + blind.iter().map(|b| b["connects"].as_u64().unwrap_or(0) as usize).sum::<usize>(),
        2,
        "{context}"
    );
    for b in &blind {
        assert!(b["reason"].as_str().is_some_and(|r| r.contains("capture.scope")), "{context}");
    }
    // tls_loop never connected to a model endpoint: none of its calls was seen.
    let loop_records = records.iter().filter(|r| r["pid"].as_u64() == Some(loop_pid)).count();
    assert_eq!(loop_records, 0, "{context}");
    print_probe_delays(&agent.logs());
    eprintln!("scoped capture: first call {}", if calls == 2 { "recorded" } else { "reported as a blind spot" });
}

/// Scoped capture probes a process from its start when it can be known to need it: a later
/// process of a program (executable and cgroup) that connected to a model endpoint, from its
/// exec, and a child of a probed process, from its fork. Their first calls, on their first
/// connections half a second after their start, are recorded whole; probes attached at the
/// connect would lose that race on loopback.
#[test]
fn scoped_capture_probes_known_programs_and_children_from_their_start() {
    let _serial = serial();
    require_root();
    let cert = TempCert::generate();
    let cg = TestCgroup::new("scoped-start");
    let pins = PinDir::new("scoped-start");
    let mock = MockProvider::start(&cert);
    let (cfg, mut agent) = start_scoped(&cg, &pins, &mock);

    // python3 in this cgroup becomes a known program (its own calls race their probes).
    let first =
        Command::new("python3").arg("-c").arg(TWO_CALLS_PY).arg(mock.port.to_string()).output().expect("python3");
    assert!(first.status.success(), "python: {}", String::from_utf8_lossy(&first.stderr));
    let later =
        Command::new("python3").arg("-c").arg(LATER_CALLS_PY).arg(mock.port.to_string()).output().expect("python3");
    let out = String::from_utf8_lossy(&later.stdout).into_owned();
    assert!(later.status.success(), "python: {out}{}", String::from_utf8_lossy(&later.stderr));
    let pid_of = |tag: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(tag).and_then(|p| p.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {tag} line in {out}"))
    };
    let (exec_pid, fork_pid) = (pid_of("exec "), pid_of("fork "));
    assert_eq!(out.lines().filter(|l| l.trim().ends_with("200")).count(), 2, "{out}");
    let calls = |records: &[Value], p: u64| -> Vec<Value> {
        records.iter().filter(|r| r["type"] == "llm_call" && r["pid"].as_u64() == Some(p)).cloned().collect()
    };
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    while (calls(&agent.records(), exec_pid).is_empty() || calls(&agent.records(), fork_pid).is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(GRACE_MS + 1000));
    let status: Value = serde_json::from_str(&cfg.ctl_ok(&["status", "--json"])).expect("status JSON");
    let text = cfg.ctl_ok(&["status"]);
    let records = agent.stop();
    let context = format!("records: {records:#?}\n{status:#}\n{}", agent.logs());
    // `status` counts the processes probed, and why.
    let scoped = &status["capture"]["scoped"];
    // (At least: another python3 started in this cgroup meanwhile would be probed too.)
    for count in ["at_connect", "at_exec", "at_fork", "programs"] {
        assert!(scoped[count].as_u64() >= Some(1), "{count}: {context}");
    }
    assert_eq!(scoped["process_events"], true, "{context}");
    assert_eq!(scoped["events_lost"], 0, "{context}");
    assert!(text.contains("scoped capture: processes probed at their connect"), "{text}");
    for (what, pid) in [("the exec'd process", exec_pid), ("the forked child", fork_pid)] {
        let seen = calls(&records, pid);
        assert_eq!(seen.len(), 1, "{what}'s first call: {context}");
        assert_eq!(seen[0]["status"], 200, "{what}'s call whole: {context}");
        assert_eq!(seen[0]["output_tokens"], 10, "{what}'s response read: {context}");
        let blind = records.iter().filter(|r| r["type"] == "blind_spot" && r["pid"].as_u64() == Some(pid)).count();
        assert_eq!(blind, 0, "{what} is not a blind spot: {context}");
    }
    print_probe_delays(&agent.logs());
}
