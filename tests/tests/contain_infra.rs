//! Checks of the containment test support itself, without the daemon: the test cgroup
//! holds its clients and cleans up after them, the three clients report a refused connect
//! the way the containment tests expect (the connect programs attached here directly,
//! through the agent library, to the test cgroup only), the pin directory guard unpins,
//! and the mock provider's --name, x-mock-delay-ms and /stats work.
//!
//! The cgroup and bpffs tests need root; the mock test does not.

use std::{
    net::{IpAddr, Ipv4Addr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aegis_agent::enforce::{
    connect::{ConnectGuard, DestRule, FailMode, RuleAction, RuleScope},
    sockdiag::IpNet,
};
use aegis_tests::{
    Client, KeepAlive, MockProvider, PinDir, Plan, TempCert, TestCgroup, plans, python_exe, require_root, run_python,
    serial,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

fn cgroup_of(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    aegis_agent::cgroup::parse_proc_cgroup(&text).unwrap_or_default()
}

#[test]
fn test_cgroup_holds_its_processes_and_is_removed_after_them() {
    let _serial = serial();
    require_root();
    let cg = TestCgroup::new("infra");
    let dir = cg.path().to_path_buf();
    assert!(dir.join("cgroup.procs").exists(), "{}", dir.display());
    assert!(cg.rel().starts_with("/aegis-test-ct-infra-"), "{}", cg.rel());

    // A child started through the guard runs inside; /proc names the cgroup as rel().
    let mut cmd = Command::new(python_exe());
    cmd.args(["-c", "print(open('/proc/self/cgroup').read())"]).stdout(Stdio::piped());
    let out = cg.spawn(cmd, "python").wait_with_output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.lines().any(|l| l == format!("0::{}", cg.rel())), "{line}");

    // One long-lived process started by the guard (killed on drop) and one put there
    // without the guard's knowledge (moved out, not killed).
    let mut sleep = Command::new("sleep");
    sleep.arg("60");
    let mut ours = cg.spawn(sleep, "sleep");
    let mut foreign_cmd = Command::new("sleep");
    foreign_cmd.arg("60");
    cg.enter(&mut foreign_cmd);
    let mut foreign = foreign_cmd.spawn().unwrap();
    let mut inside = cg.procs();
    inside.sort_unstable();
    let mut want = vec![ours.id(), foreign.id()];
    want.sort_unstable();
    assert_eq!(inside, want);
    assert_eq!(cgroup_of(foreign.id()), cg.rel());

    drop(cg);
    assert!(!dir.exists(), "the test cgroup {} was not removed", dir.display());
    let status = ours.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the guard's own process must be killed: {status}"
    );
    assert!(foreign.try_wait().unwrap().is_none(), "a process the guard did not start must not be killed");
    assert_eq!(cgroup_of(foreign.id()), "/", "it is moved to the root cgroup");
    let _ = kill(Pid::from_raw(foreign.id() as i32), Signal::SIGKILL);
    let _ = foreign.wait();
}

/// What `contain.rs` expects from a refused connect, checked against the real connect
/// programs (attached by this test, through the agent library, to its own cgroup).
#[test]
fn clients_in_the_test_cgroup_see_eperm_from_a_connect_program() {
    let _serial = serial();
    require_root();
    let cert = TempCert::generate();
    let blocked = MockProvider::start(&cert);
    let open = MockProvider::start(&cert);
    let cg = TestCgroup::new("infra-eperm");
    let plan = Plan::single(vec![plans::openai_chat("gpt-4o-mini", "hello")]);
    let pins = PinDir::new("infra-eperm");
    {
        let (mut guard, _) = ConnectGuard::open(cg.path(), pins.path(), FailMode::Closed)
            .expect("attaching the connect programs to the test cgroup");
        let lo = IpNet::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 32).unwrap();
        let rule = DestRule {
            id: 42,
            net: lo,
            port: Some(blocked.port),
            scope: RuleScope::Any,
            action: RuleAction::Deny,
            expires: None,
        };
        guard.set_rules(&[rule]).unwrap();

        for client in Client::ALL {
            cg.run(client, blocked.port, &plan).assert_connect_refused("");
            let run = cg.run(client, open.port, &plan).assert_ok("");
            assert_eq!(cgroup_of(std::process::id()), "/", "the test itself stays outside");
            assert!(run.responses[0].server.is_none(), "an unnamed mock sends no x-mock-server");
        }
        assert_eq!(cg.connect_errno(blocked.port), libc::EPERM);
        assert_eq!(cg.connect_errno(open.port), 0);
        // Outside the cgroup nothing changes.
        TcpStream::connect(("127.0.0.1", blocked.port)).expect("outside the test cgroup a connect works");
        run_python(blocked.port, &plan).assert_responses(&plan);

        // The keep-alive client: refused at its first connect, and again on reconnect.
        let mut ka = KeepAlive::start(&cg, blocked.port, &plan.connections[0][0]);
        assert_eq!(ka.connected["ok"], false, "{}", ka.connected);
        assert_eq!(ka.connected["errno"], libc::EPERM, "{}", ka.connected);
        let again = ka.op("reconnect");
        assert_eq!(
            (again["ok"].as_bool(), again["errno"].as_i64()),
            (Some(false), Some(i64::from(libc::EPERM))),
            "{again}"
        );
        ka.quit();

        let denials = guard.denials();
        assert!(denials.iter().all(|d| d.block_id == 42 && d.port == blocked.port), "{denials:?}");
        let comms: Vec<&str> = denials.iter().map(|d| d.comm.as_str()).collect();
        for comm in ["curl", "node"] {
            assert!(comms.contains(&comm), "no denial for {comm}: {comms:?}");
        }
        assert!(comms.iter().any(|c| c.starts_with("python")), "{comms:?}");
        guard.remove().expect("detaching");
    }
    // Detached.
    cg.run(Client::Curl, blocked.port, &plan).assert_ok("");
}

/// The keep-alive client keeps one connection for its calls and reports the source port.
#[test]
fn keep_alive_client_reuses_one_connection() {
    let _serial = serial();
    require_root();
    let cert = TempCert::generate();
    let mock = MockProvider::start(&cert);
    let cg = TestCgroup::new("infra-keepalive");
    let req = plans::openai_chat("gpt-4o-mini", "keep me alive");
    let mut ka = KeepAlive::start(&cg, mock.port, &req);
    assert_eq!(ka.connected["ok"], true, "{}", ka.connected);
    let sport = ka.connected["sport"].as_u64().expect("a source port");
    for _ in 0..3 {
        let r = ka.op("call");
        assert_eq!(
            (r["ok"].as_bool(), r["status"].as_u64(), r["sport"].as_u64()),
            (Some(true), Some(200), Some(sport)),
            "{r}"
        );
    }
    let r = ka.op("reconnect");
    assert_eq!(r["ok"], true, "{r}");
    assert_ne!(r["sport"].as_u64(), Some(sport), "{r}");
    assert_eq!(ka.op("call")["status"], 200);
    assert_eq!(mock.requests_to("/v1/chat/completions"), 4);
    ka.quit();
}

#[test]
fn pin_dir_guard_unpins_everything() {
    let _serial = serial();
    require_root();
    let pins = PinDir::new("infra");
    let dir = pins.path().to_path_buf();
    std::fs::create_dir_all(dir.join("sub")).expect("a directory on bpffs");
    for path in [dir.join("m"), dir.join("sub/m")] {
        let out = Command::new("bpftool")
            .args(["map", "create"])
            .arg(&path)
            .args(["type", "hash", "key", "4", "value", "4", "entries", "1", "name", "aegis_ct_infra"])
            .output()
            .expect("bpftool");
        assert!(out.status.success(), "bpftool map create: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(pins.entries(), ["m", "sub/m"]);
    drop(pins);
    assert!(!dir.exists(), "{} is still there", dir.display());
}

/// No root: the mock's test hooks.
#[test]
fn mock_names_itself_waits_when_asked_and_counts_requests() {
    let cert = TempCert::generate();
    let named = MockProvider::start_named(&cert, "fallback");
    let chat = plans::openai_chat("gpt-4o-mini", "who answers?");
    let plan = Plan::single(vec![chat.clone(), plans::health()]);
    for client in Client::ALL {
        let run = client.run(named.port, &plan);
        run.assert_responses(&plan);
        for r in &run.responses {
            assert_eq!(r.server.as_deref(), Some("fallback"), "{}: {r:?}", run.client);
        }
    }
    // The chat reply carries the name.
    let out = Command::new(python_exe())
        .arg(aegis_tests::tests_dir().join("clients/py_client.py"))
        .args(["--port", &named.port.to_string(), "--print-body", "--plan-json"])
        .arg(serde_json::Value::Array(vec![chat.to_plan_json()]).to_string())
        .output()
        .unwrap();
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one response line");
    let body: serde_json::Value = serde_json::from_str(line["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "[fallback] This is a mock reply from the AegisPlane test provider."
    );

    let delayed = Plan::single(vec![chat.clone().header("x-mock-delay-ms", "400")]);
    let t0 = Instant::now();
    Client::Curl.run(named.port, &delayed).assert_responses(&delayed);
    assert!(t0.elapsed() >= Duration::from_millis(400), "{:?}", t0.elapsed());

    let stats = named.stats();
    assert_eq!(stats["by_path"]["/v1/chat/completions"], 5, "{stats}");
    assert_eq!(stats["by_path"]["/health"], 3, "{stats}");
    assert_eq!(stats["requests"], 8, "GET /stats itself is not counted: {stats}");
    let mut probe = plans::openai_chat("m", "x");
    probe.path = "/v1/chat/completions?probe=1".into();
    let q = Plan::single(vec![probe]);
    run_python(named.port, &q).assert_responses(&q);
    assert_eq!(named.requests_to("/v1/chat/completions?probe=1"), 1);
}
