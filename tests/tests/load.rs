//! Load on the real agent, from real clients against the local TLS mock (both ends of every
//! call are captured, so every call must come out as one record with both ends joined):
//! hundreds of concurrent connections, HTTP/1.1 pipelining, and keep-alive churn. The
//! records are counted exactly (nothing missing, nothing split, nothing twice), and the
//! agent's memory must stay bounded. Runs in about a minute on the 2-core VM.

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use aegis_tests::{
    Agent, MockProvider, Plan, Request, TempCert, plans, python_exe, require_root, run_python, serial, tests_dir,
    wait_with_timeout,
};
use serde_json::Value;

/// Concurrent connections, and calls on each.
const CONNECTIONS: usize = 200;
const CALLS_PER_CONNECTION: usize = 15;
/// Pipelining connections, and requests written at once on each.
const PIPELINED: usize = 20;
const DEPTH: usize = 10;
/// Short connections of one call each, opened and closed at once.
const CHURN: usize = 300;
/// How much the agent's resident memory may grow over the run. Its buffers are bounded
/// per connection and per queue; what this run holds at most (a few hundred connections,
/// records waiting to be joined) is far below this.
const RSS_GROWTH_MAX_KIB: u64 = 96 * 1024;

/// `VmRSS` and `VmHWM` (peak) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading the agent's status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn chat(model: &str, stream: bool) -> Request {
    if stream {
        plans::openai_chat_stream(model, "Stream a short answer under load.", true)
    } else {
        plans::openai_chat(model, "Answer briefly under load.")
    }
}

#[test]
fn under_load_every_call_is_one_joined_record_and_memory_stays_bounded() {
    let _serial = serial();
    require_root();
    let cert = TempCert::generate();
    let mock = MockProvider::start(&cert);
    let agent = Agent::start();
    let (rss_start, _) = memory_kib(agent.pid());
    let started = Instant::now();

    // Hundreds of connections at once, a streamed call in every four.
    let plan = Plan {
        connections: (0..CONNECTIONS)
            .map(|c| (0..CALLS_PER_CONNECTION).map(|i| chat(&format!("load-{c}-{i}"), i % 4 == 3)).collect())
            .collect(),
    };
    run_python(mock.port, &plan).assert_responses(&plan);
    let concurrent = started.elapsed();

    // Pipelining: every connection writes its requests in one go, then reads the answers.
    let mut cmd = Command::new(python_exe());
    cmd.arg(tests_dir().join("clients/py_pipeline.py"))
        .args(["--port", &mock.port.to_string(), "--connections", &PIPELINED.to_string()])
        .args(["--depth", &DEPTH.to_string(), "--prefix", "pipe"])
        .stdout(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("starting py_pipeline.py");
    let status = wait_with_timeout(&mut child, "py_pipeline.py", Duration::from_secs(120));
    assert!(status.success(), "the pipelining client saw a wrong or missing answer ({status})");

    // Churn: one call per connection, connections opened and closed at once.
    let churn = Plan { connections: (0..CHURN).map(|c| vec![chat(&format!("churn-{c}"), c % 2 == 0)]).collect() };
    run_python(mock.port, &churn).assert_responses(&churn);
    let clients_done = started.elapsed();

    let expected = CONNECTIONS * CALLS_PER_CONNECTION + PIPELINED * DEPTH + CHURN;
    let ours =
        |r: &Value| r["model"].as_str().is_some_and(|m| ["load-", "pipe-", "churn-"].iter().any(|p| m.starts_with(p)));
    let complete = agent.wait_until(ours, expected, Duration::from_secs(60));
    let (rss_end, rss_peak) = memory_kib(agent.pid());
    let records: Vec<Value> = agent.records().into_iter().filter(ours).collect();
    let context = format!(
        "\n{expected} calls, {} records; clients took {concurrent:?} (concurrent) and {clients_done:?} in all; \
         agent RSS {rss_start} KiB at start, {rss_end} KiB after, peak {rss_peak} KiB{}",
        records.len(),
        agent.logs()
    );
    eprintln!("{context}");
    assert!(complete, "not every call was recorded within 60 s{context}");

    // Exactly one record per call, with both ends and the call's own answer.
    let mut per_model: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &records {
        *per_model.entry(r["model"].as_str().unwrap()).or_default() += 1;
        assert_eq!(r["response_model"], r["model"], "another call's answer: {r}{context}");
        assert!(r["server"]["pid"].as_u64() == Some(u64::from(mock.pid())), "a half alone: {r}{context}");
        assert_eq!(r["complete"], true, "{r}{context}");
    }
    let twice: Vec<_> = per_model.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "calls recorded more than once: {twice:?}{context}");
    assert_eq!(per_model.len(), expected, "calls missing{context}");
    for (prefix, n) in [("load-", CONNECTIONS * CALLS_PER_CONNECTION), ("pipe-", PIPELINED * DEPTH), ("churn-", CHURN)]
    {
        assert_eq!(per_model.keys().filter(|m| m.starts_with(prefix)).count(), n, "{prefix}*{context}");
    }
    assert!(
        rss_end <= rss_start + RSS_GROWTH_MAX_KIB,
        "the agent's resident memory grew from {rss_start} KiB to {rss_end} KiB, more than the \
         {RSS_GROWTH_MAX_KIB} KiB this load may cost: something is not bounded{context}"
    );
}
