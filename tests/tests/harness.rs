//! Checks of the harness itself, without the agent or root: the mock provider answers
//! every plan as the expectations assume, the three clients work and keep one connection,
//! and the Rust token count mirrors the mock's.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use aegis_tests::{
    Identity, MockProvider, Plan, Request, TempCert, TlsExpect, Tokens, check_calls, expected_calls,
    expected_input_tokens, plans, python_exe, run_curl, run_node, run_python, tests_dir,
};
use serde_json::{Value, json};

fn all_requests() -> Vec<Request> {
    let mut reqs = plans::common_requests();
    reqs.extend(plans::more_api_requests());
    reqs.push(Request::get("/no/such/path"));
    reqs.push(plans::openai_chat("gpt-4o-mini", "rate limited").header("x-mock-status", "429"));
    reqs
}

#[test]
fn input_token_count_mirrors_the_mock() {
    let mut bodies: Vec<Value> = all_requests().into_iter().filter_map(|r| r.body).collect();
    bodies.extend(plans::concurrent_plan(3, 5).requests().filter_map(|r| r.body.clone()));
    bodies.extend([
        json!({}),
        json!({"messages": []}),
        json!({"prompt": "  leading\tand\ntrailing  whitespace  "}),
        json!({"prompt": ["a b", "c"], "input": 3, "messages": [{"role": "user", "content": null}]}),
        json!({"system": [{"type": "text", "text": "one two"}], "messages": [{"role": "assistant", "content": "three"}]}),
        json!({"input": {"nested": {"deeper": ["x y z", {"type": "ignored words here", "text": "w"}]}}}),
        json!({"model": "not counted", "contents": [{"parts": [{"text": "counted words"}]}], "other": "no"}),
    ]);
    let script = "import sys, json\nsys.dont_write_bytecode = True\nsys.path.insert(0, sys.argv[1])\nfrom mock_provider import count_input_words\n\
                  for line in sys.stdin:\n    print(count_input_words(json.loads(line)))\n";
    let mut child = Command::new(python_exe())
        .args(["-c", script])
        .arg(tests_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning python");
    let input: String = bodies.iter().map(|b| format!("{b}\n")).collect();
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("writing bodies");
    let out = child.wait_with_output().expect("python output");
    assert!(out.status.success());
    let counts: Vec<u64> = String::from_utf8_lossy(&out.stdout).lines().map(|l| l.parse().expect("a count")).collect();
    assert_eq!(counts.len(), bodies.len());
    for (body, count) in bodies.iter().zip(counts) {
        assert_eq!(expected_input_tokens(body), count, "token count differs for {body}");
    }
}

#[test]
fn mock_and_clients_work_without_the_agent() {
    let cert = TempCert::generate();
    let mock = MockProvider::start(&cert);
    let plan = Plan::single(all_requests());
    for run in [run_curl(mock.port, &plan), run_python(mock.port, &plan), run_node(mock.port, &plan)] {
        run.assert_responses(&plan);
        assert!(run.responses.iter().all(|r| r.conn == 0));
    }
    let concurrent = plans::concurrent_plan(4, 5);
    let run = run_python(mock.port, &concurrent);
    run.assert_responses(&concurrent);
    let tids: std::collections::BTreeSet<_> = run.responses.iter().map(|r| r.tid).collect();
    assert_eq!(tids.len(), 4, "one thread per connection");
    run_node(mock.port, &concurrent).assert_responses(&concurrent);
    assert!(!mock.stderr_tail().contains("Traceback"), "mock errors:\n{}", mock.stderr_tail());
}

#[test]
fn expectations_cover_every_api() {
    let plan = Plan::single(all_requests());
    let apis: std::collections::BTreeSet<&str> = expected_calls(&plan).iter().map(|c| c.api).collect();
    for api in [
        "chat_completions",
        "completions",
        "responses",
        "embeddings",
        "anthropic_messages",
        "gemini_generate_content",
        "ollama_chat",
    ] {
        assert!(apis.contains(api), "no {api} call in the plans");
    }
    // Ordinary requests are never expected as calls.
    assert!(expected_calls(&Plan::single(vec![plans::health(), plans::blob(), plans::login()])).is_empty());
}

/// A record as a correct agent would write it for `e`.
fn ideal_record(e: &aegis_tests::ExpectedCall, n: usize, host: &str, client: &Identity, server: &Identity) -> Value {
    let tokens = |t: Tokens| match t {
        Tokens::Exact(v) => json!(v),
        Tokens::Null | Tokens::NullOrZero => Value::Null,
    };
    let proc = |p: &Identity, tid: u32| {
        let (lib, stack, hooks) = match &p.tls {
            TlsExpect::LibSsl => {
                ("/usr/lib/x86_64-linux-gnu/libssl.so.3".to_string(), "openssl", ["SSL_write", "SSL_read"])
            }
            TlsExpect::Binary(b) => (b.display().to_string(), "openssl", ["SSL_write", "SSL_read"]),
            TlsExpect::BoringSsl(b) => (b.display().to_string(), "boringssl", ["SSL_write", "SSL_read"]),
            TlsExpect::Go(b) => {
                (b.display().to_string(), "go-crypto/tls", ["crypto/tls.(*Conn).Write", "crypto/tls.(*Conn).Read"])
            }
            TlsExpect::GnuTls => (
                "/usr/lib/x86_64-linux-gnu/libgnutls.so.30".to_string(),
                "gnutls",
                ["gnutls_record_send", "gnutls_record_recv"],
            ),
        };
        json!({"pid": p.pid, "tid": tid, "comm": p.comm, "exe": p.exe, "uid": nix::unistd::geteuid().as_raw(), "cgroup": "/test.slice",
               "tls": {"library": lib, "stack": stack, "hooks": hooks}})
    };
    let mut r = json!({
        "type": "llm_call", "call_id": format!("{n:016x}"), "time": "2026-11-26T17:00:00.123456Z",
        "provider": "openai_compatible", "api": e.api, "host": host, "method": "POST", "path": e.path,
        "model": e.model, "response_model": e.model, "stream": e.stream, "status": e.status,
        "ttfb_ms": 1.0, "latency_ms": 2.5, "request_bytes": e.request_body_len + 100, "response_bytes": 300,
        "input_tokens": tokens(e.input_tokens), "output_tokens": tokens(e.output_tokens),
        "finish_reason": e.finish_reason, "side": "client", "complete": true, "notes": [],
    });
    let obj = r.as_object_mut().expect("object");
    if let Value::Object(p) = proc(client, client.pid) {
        obj.extend(p);
    }
    obj.insert("server".into(), proc(server, server.pid + 1));
    r
}

#[test]
fn checker_accepts_right_records_and_rejects_wrong_ones() {
    let plan = Plan::single(all_requests());
    let expected = expected_calls(&plan);
    let host = "127.0.0.1:4443";
    let ident = |pid, exe: &str, tls| Identity { pid, comm: "x".into(), exe: exe.into(), tls, single_thread: true };
    let client = ident(100, "/usr/bin/curl", TlsExpect::LibSsl);
    let server = Identity { single_thread: false, ..ident(200, "/usr/bin/python3.11", TlsExpect::LibSsl) };
    let good: Vec<Value> =
        expected.iter().enumerate().map(|(n, e)| ideal_record(e, n, host, &client, &server)).collect();
    // Unrelated records (other hosts and processes) are ignored.
    let mut with_noise = good.clone();
    with_noise.push(json!({"host": "api.openai.com", "pid": 999, "server": null}));
    let problems = check_calls(&with_noise, &expected, host, &client, &server);
    assert!(problems.is_empty(), "{problems:#?}");

    type Mutation = Box<dyn Fn(&mut Vec<Value>)>;
    let mutations: Vec<(&str, Mutation)> = vec![
        (
            "missing record",
            Box::new(|rs| {
                rs.pop();
            }),
        ),
        (
            "duplicate record",
            Box::new(|rs| {
                let mut d = rs[0].clone();
                d["call_id"] = json!("ffffffffffffffff");
                rs.push(d);
            }),
        ),
        ("wrong output tokens", Box::new(|rs| rs[1]["output_tokens"] = json!(9))),
        ("wrong input tokens", Box::new(|rs| rs[2]["input_tokens"] = json!(1))),
        ("null where usage exists", Box::new(|rs| rs[0]["input_tokens"] = Value::Null)),
        ("wrong model", Box::new(|rs| rs[0]["model"] = json!("other"))),
        (
            "wrong stream flag",
            Box::new(|rs| {
                let s = rs[3]["stream"].as_bool().unwrap();
                rs[3]["stream"] = json!(!s);
            }),
        ),
        ("wrong status", Box::new(|rs| rs[0]["status"] = json!(500))),
        ("wrong api", Box::new(|rs| rs[0]["api"] = json!("completions"))),
        (
            "wrong caller pid",
            Box::new(|rs| {
                rs[0]["pid"] = json!(101);
                rs[0]["tid"] = json!(101);
            }),
        ),
        ("wrong server pid", Box::new(|rs| rs[0]["server"]["pid"] = json!(201))),
        ("no server", Box::new(|rs| rs[0]["server"] = Value::Null)),
        ("wrong exe", Box::new(|rs| rs[0]["exe"] = json!("/usr/bin/wget"))),
        ("server side", Box::new(|rs| rs[0]["side"] = json!("server"))),
        ("incomplete", Box::new(|rs| rs[0]["complete"] = json!(false))),
        ("bad call_id", Box::new(|rs| rs[0]["call_id"] = json!("xyz"))),
        ("wrong host", Box::new(|rs| rs[0]["host"] = json!("127.0.0.1:1"))),
        ("tid of another thread", Box::new(|rs| rs[0]["tid"] = json!(12345))),
        ("node tls library", Box::new(|rs| rs[0]["tls"]["library"] = json!("/usr/bin/node"))),
    ];
    for (what, mutate) in mutations {
        let mut records = good.clone();
        mutate(&mut records);
        assert!(!check_calls(&records, &expected, host, &client, &server).is_empty(), "checker missed: {what}");
    }
}
