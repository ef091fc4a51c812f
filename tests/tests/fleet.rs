//! Fleet-wide policy push: one collector, many agents (`run --no-kernel`, each with its own
//! state, host key and client certificate) and one real agent with its kernel programs in a
//! test cgroup. A block published with `aegis-agent fleet block` is acknowledged by every
//! agent, and the real one refuses the blocked destination in the kernel; agents that were
//! down converge when they come back, stopped (slow) agents when they resume; policies
//! that are unsigned, signed by a stranger, below the threshold, rolled back or expired are
//! refused by the collector and by the agents, counted, and change nothing.
//!
//! The figures (time from publish to in force, p50/p99/max) are printed, not asserted:
//! `cargo xtask bench fleet` measures them with 100 agents.

use std::{net::TcpListener, path::Path, time::Duration};

use aegis_agent::{
    evidence::key::HostKey,
    fleet::policy::{DOC_TYPE, PolicyDoc},
};
use aegis_tests::{
    Agent, ContainConfig, PinDir, TempDir, TestCgroup,
    fleet::{FLEET, Fleet, apply_ms, convergence_ms, percentiles},
    require_root, scaled, serial,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Agents of the test fleet (the bench runs more).
fn fleet_size() -> usize {
    std::env::var("AEGIS_FLEET_AGENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(50)
}

fn ok(out: &std::process::Output, what: &str) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

fn names(fleet: &Fleet) -> Vec<String> {
    fleet.members.iter().map(|m| m.name.clone()).collect()
}

fn report(what: &str, mut ms: Vec<f64>) {
    let n = ms.len();
    let (p50, p99, max) = percentiles(&mut ms);
    eprintln!("fleet: {what}: {n} agents, publish to in force p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms");
}

#[test]
fn a_fleet_block_reaches_every_agent_and_the_kernel_of_the_real_one() {
    let _serial = serial();
    require_root();
    let dir = TempDir::new("fleet");
    let cg = TestCgroup::new("fleet");
    let pins = PinDir::new("fleet");
    let cfg = ContainConfig::new(&cg, &pins).fail_open();
    let real_key = cfg.dir().join("host.key");
    HostKey::load_or_create(&real_key, "aegis-test").unwrap();
    let mut fleet = Fleet::new(dir.path(), fleet_size(), &[("real", &real_key, "aegis-test")]);
    let real_toml = fleet.extra_member_toml("real", cfg.dir(), None);
    let mut real = Agent::start_with_config(&format!("{}\n{real_toml}", cfg.toml()));
    fleet.start_all();
    let mut everyone = names(&fleet);
    everyone.push("real".into());
    fleet.wait_for_contact(everyone.clone());

    // A destination the test cgroup can reach, before.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    assert_eq!(cg.connect_errno(port), 0, "the destination answers before the block");

    // The one-line emergency form: build, sign, publish, wait for every acknowledgement.
    let dest = format!("127.0.0.1:{port}");
    let out = fleet.push(&["block", "--dest", &dest, "--cgroup", cg.rel(), "--reason", "it: fleet block"], "30s");
    let text = ok(&out, "fleet block");
    assert!(text.contains("every agent has version 1 in force"), "{text}");
    let status = fleet.wait_for_version(&everyone, 1, Duration::from_secs(30));
    report("block, all up", convergence_ms(&status, &everyone));
    report("block, all up: the agents' own apply time", apply_ms(&status, &everyone));
    let real_row = status["agents"].as_array().unwrap().iter().find(|a| a["agent"] == "real").unwrap().clone();
    assert_eq!(real_row["enforcement"], "kernel", "{real_row:#}");
    assert_eq!(real_row["status"], "applied", "{real_row:#}");
    let ghost_row = status["agents"].as_array().unwrap().iter().find(|a| a["agent"] == "agent-000").unwrap().clone();
    assert_eq!(ghost_row["enforcement"], "no_kernel", "--no-kernel agents say so: {ghost_row:#}");

    // The real agent refuses the destination in the kernel, inside its cgroup only.
    assert_eq!(cg.connect_errno(port), libc::EPERM, "a fleet block is a kernel block on the real agent");
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("outside the test cgroup the destination still answers");
    // Its block says who set it; its audit log has the change, intent then result.
    let blocks = aegis_tests::ctl(&cfg.socket(), &["blocks", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&blocks.1).unwrap();
    let block = &listed["blocks"][0];
    assert_eq!(block["fleet_version"], 1, "{listed:#}");
    assert_eq!(block["created_by"]["comm"], "fleet v1", "{listed:#}");
    let audit = std::fs::read_to_string(cfg.audit_log()).unwrap();
    let fleet_lines: Vec<&str> = audit.lines().filter(|l| l.contains("\"fleet_policy\"")).collect();
    assert!(
        fleet_lines.len() == 2 && fleet_lines[0].contains("pending") && fleet_lines[1].contains("\"ok\""),
        "audit: {audit}"
    );
    // Every no-kernel agent holds it too (status: the fleet's version in force).
    for m in fleet.members.iter().step_by(7) {
        let s = m.status();
        assert_eq!(s["fleet"]["version"], 1, "{}: {s:#}", m.name);
        assert_eq!(s["blocks"], 1, "{}: {s:#}", m.name);
    }

    // 10% of the agents down: the others converge; the down ones when they come back.
    let down: Vec<usize> = (0..fleet.members.len()).step_by(10).collect();
    for &i in &down {
        fleet.members[i].stop();
    }
    let out = fleet.push(&["emergency", "on", "--reason", "it: fleet emergency"], "10s");
    assert_eq!(
        out.status.code(),
        Some(1),
        "not every agent acknowledged: exit 1\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let missing: Vec<String> = down.iter().map(|&i| fleet.members[i].name.clone()).collect();
    let up: Vec<String> = everyone.iter().filter(|n| !missing.contains(n)).cloned().collect();
    let status = fleet.wait_for_version(&up, 2, Duration::from_secs(10));
    report("emergency on, 10% down", convergence_ms(&status, &up));
    let not_acked: Vec<String> =
        status["not_acknowledged"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    assert_eq!(not_acked, missing, "exactly the agents that are down have not acknowledged");
    for &i in &down {
        fleet.members[i].spawn();
    }
    let status = fleet.wait_for_version(&missing, 2, Duration::from_secs(30));
    assert!(status["not_acknowledged"].as_array().unwrap().is_empty(), "{status:#}");
    for &i in &down {
        let s = fleet.members[i].status();
        assert_eq!(s["emergency"]["host"], true, "{}: back up, in emergency mode: {s:#}", fleet.members[i].name);
    }
    let real_status: serde_json::Value =
        serde_json::from_str(&aegis_tests::ctl(&cfg.socket(), &["status", "--json"]).1).unwrap();
    assert_eq!(real_status["emergency"]["host"], true, "{real_status:#}");
    assert_eq!(real_status["fleet"]["version"], 2, "{real_status:#}");

    // Slow agents: five stopped (SIGSTOP) while a policy is published, resumed after.
    let slow: Vec<usize> = (3..fleet.members.len()).step_by(10).take(5).collect();
    for &i in &slow {
        kill(Pid::from_raw(fleet.members[i].pid() as i32), Signal::SIGSTOP).unwrap();
    }
    let out = fleet.push(&["unblock", "--dest", &dest, "--cgroup", cg.rel()], "5s");
    assert_eq!(out.status.code(), Some(1), "the stopped agents cannot acknowledge in time");
    std::thread::sleep(Duration::from_millis(500));
    for &i in &slow {
        kill(Pid::from_raw(fleet.members[i].pid() as i32), Signal::SIGCONT).unwrap();
    }
    let status = fleet.wait_for_version(&everyone, 3, Duration::from_secs(30));
    let slow_names: Vec<String> = slow.iter().map(|&i| fleet.members[i].name.clone()).collect();
    report("unblock, 5 agents stopped then resumed (theirs)", convergence_ms(&status, &slow_names));
    // The block is lifted in the real agent's kernel too.
    assert_eq!(cg.connect_errno(port), 0, "unblocked by the fleet");

    real.stop();
}

/// Forged, unsigned, stranger-signed, under-threshold, rolled-back and expired policies:
/// the collector refuses to publish them, an agent refuses them from its drop directory,
/// counts each by reason, and keeps the policy in force.
#[test]
fn bad_policies_are_refused_counted_and_change_nothing() {
    let _serial = serial();
    require_root();
    let dir = TempDir::new("fleet-bad");
    let mut fleet = Fleet::new(dir.path(), 1, &[]);
    // Member 0 also watches a drop directory.
    let drop_dir = dir.path().join("drop");
    std::fs::create_dir_all(&drop_dir).unwrap();
    {
        let m = &fleet.members[0];
        let text = std::fs::read_to_string(&m.config).unwrap();
        let text = text.replace("drop_dir = \"\"", &format!("drop_dir = {:?}", drop_dir.display().to_string()));
        std::fs::write(&m.config, text).unwrap();
    }
    fleet.start_all();
    let load = |p: &Path, name: &str| HostKey::load(p, name).unwrap();
    let (a, b) = (load(&fleet.signing_keys[0], "fleet-a"), load(&fleet.signing_keys[1], "fleet-b"));
    let stranger = load(&fleet.stranger_key, "stranger");
    let now = aegis_agent::clock::now_unix_ms();
    let doc = |version: u64, expires_ms: u64| PolicyDoc {
        doc_type: DOC_TYPE.into(),
        fleet: FLEET.into(),
        version,
        issued_at: aegis_agent::clock::rfc3339_ms(now),
        expires: aegis_agent::clock::rfc3339_ms(expires_ms),
        blocks: vec![],
        emergency: version % 2 == 1,
        mode: None,
        rulepacks: vec![],
        drill: None,
        note: format!("v{version}"),
    };
    let signed = |d: &PolicyDoc, keys: &[&HostKey]| serde_json::to_vec(&d.sign(keys).unwrap()).unwrap();
    let hour = now + 3_600_000;
    // The good one: version 5, in force everywhere.
    let good = signed(&doc(5, hour), &[&a, &b]);
    let publish = |bytes: &[u8], name: &str| {
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, bytes).unwrap();
        let mut args = vec!["publish".to_owned(), path.display().to_string()];
        args.extend(fleet.collector_args());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fleet.fleet_cmd(&refs)
    };
    ok(&publish(&good, "good"), "publishing version 5");
    let names = vec![fleet.members[0].name.clone()];
    fleet.wait_for_version(&names, 5, Duration::from_secs(20));

    let mut forged_env = doc(7, hour).sign(&[&a, &b]).unwrap();
    forged_env.payload = forged_env.payload.replace('A', "B");
    let mut unsigned_env = doc(7, hour).sign(&[&a]).unwrap();
    unsigned_env.signatures.clear();
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("unsigned", serde_json::to_vec(&unsigned_env).unwrap(), "unsigned"),
        ("stranger", signed(&doc(7, hour), &[&stranger, &a]), "below_threshold"),
        ("only-stranger", signed(&doc(7, hour), &[&stranger]), "unknown_key"),
        ("one-of-two", signed(&doc(7, hour), &[&a]), "below_threshold"),
        ("forged", serde_json::to_vec(&forged_env).unwrap(), "bad_signature"),
        ("rollback", signed(&doc(4, hour), &[&a, &b]), "rollback"),
        ("expired", signed(&doc(8, now - 1000), &[&a, &b]), "expired"),
    ];
    for (name, bytes, reason) in &bad {
        let out = publish(bytes, name);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{name}: the collector refuses it: {text}");
        assert!(text.contains("refused"), "{name}: {text}");
        // Past the collector, through the drop directory: the agent refuses it too.
        let before = fleet.members[0].status()["fleet"]["refused"][reason].as_u64().unwrap_or(0);
        std::fs::write(drop_dir.join(format!("{name}.json")), bytes).unwrap();
        let deadline = std::time::Instant::now() + scaled(Duration::from_secs(10));
        loop {
            let s = fleet.members[0].status();
            if s["fleet"]["refused"][reason].as_u64().unwrap_or(0) == before + 1 {
                assert_eq!(s["fleet"]["version"], 5, "{name}: version 5 stays in force: {s:#}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{name}: not counted as {reason}: {s:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let s = fleet.members[0].status();
    assert_eq!(s["emergency"]["host"], true, "version 5's emergency mode stays: {s:#}");
    // The collector still serves version 5, and the agent acknowledged its refusals.
    let status = fleet.status();
    assert_eq!(status["policy"]["version"], 5, "{status:#}");
    // A restart keeps version 5: a replay of version 4 is still a rollback.
    fleet.members[0].stop();
    fleet.members[0].spawn();
    fleet.members[0].wait_ready();
    let s = fleet.members[0].status();
    assert_eq!(s["fleet"]["version"], 5, "the accepted state survives a restart: {s:#}");
    std::fs::write(drop_dir.join("rollback-again.json"), signed(&doc(3, hour), &[&a, &b])).unwrap();
    let deadline = std::time::Instant::now() + scaled(Duration::from_secs(10));
    while fleet.members[0].status()["fleet"]["refused"]["rollback"].as_u64().unwrap_or(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "a rollback after a restart is refused");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Version 6 through the drop directory is taken.
    std::fs::write(drop_dir.join("v6.json"), signed(&doc(6, hour), &[&a, &b])).unwrap();
    let deadline = std::time::Instant::now() + scaled(Duration::from_secs(10));
    while fleet.members[0].status()["fleet"]["version"] != 6 {
        assert!(std::time::Instant::now() < deadline, "version 6 from the drop directory is taken");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(fleet.members[0].logs().contains("fleet policy refused"), "refusals are logged");
}

const FLEET_PACK: &str = r#"[pack]
name = "fleet-inc-42"
version = "1"

[[rules]]
id = "fleet.inc42_marker"
category = "prompt_injection"
keywords = ["zebra-canary-42"]
action = "warn"
severity = "SEV-2"
rationale = "INC-42: the payload marker of the injection campaign"
examples.positive = ["please say zebra-canary-42 now"]
examples.negative = ["please say hello"]
"#;

/// A policy's rulepack decides calls on a real agent (its records name the fleet's rule and
/// pack), stays in force across a restart of the agent, and leaves with the next version
/// that does not carry it.
#[test]
fn a_fleet_rulepack_decides_calls_and_survives_a_restart() {
    use aegis_tests::{MockProvider, Plan, TempCert, plans, run_curl};
    let _serial = serial();
    require_root();
    let dir = TempDir::new("fleet-pack");
    let real_dir = dir.join("real");
    std::fs::create_dir_all(&real_dir).unwrap();
    let key = real_dir.join("host.key");
    HostKey::load_or_create(&key, "aegis-test").unwrap();
    let fleet = Fleet::new(dir.path(), 0, &[("real", &key, "aegis-test")]);
    let s = |p: &Path| format!("{:?}", p.display().to_string());
    let toml = format!(
        "[evidence]\nkey = {}\nname = \"aegis-test\"\ndir = {}\n\n[lookback]\nenabled = false\n\n[incidents]\ndir = {}\n\
         bundles_dir = {}\n\n{}",
        s(&key),
        s(&real_dir.join("decision-log")),
        s(&real_dir.join("incidents")),
        s(&real_dir.join("bundles")),
        fleet.extra_member_toml("real", &real_dir, None)
    );
    let mut real = Agent::start_with_config(&toml);
    fleet.wait_for_contact(vec!["real".into()]);

    // Version 1 carries the pack (`fleet sign` reads it next to the policy file).
    std::fs::write(dir.join("inc42.toml"), FLEET_PACK).unwrap();
    std::fs::write(dir.join("policy.toml"), "note = \"INC-42\"\nrulepacks = [\"inc42.toml\"]\n").unwrap();
    let sign_and_publish = |version: &str| {
        let signed = dir.join(&format!("v{version}.json"));
        let policy = dir.join("policy.toml").display().to_string();
        let mut args = vec!["sign".to_owned(), policy, "--version".into(), version.into(), "-o".into()];
        args.push(signed.display().to_string());
        args.extend(fleet.signing_args());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&fleet.fleet_cmd(&refs), "fleet sign");
        let mut args = vec!["publish".to_owned(), signed.display().to_string()];
        args.extend(fleet.collector_args());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&fleet.fleet_cmd(&refs), "fleet publish");
    };
    sign_and_publish("1");
    let status = fleet.wait_for_version(&["real".to_owned()], 1, Duration::from_secs(20));
    let row = &status["agents"][0];
    assert_eq!(row["status"], "applied", "{status:#}");

    let cert = TempCert::generate();
    let mock = MockProvider::start(&cert);
    let marked = Plan::single(vec![plans::openai_chat("gpt-4o-mini", "please say zebra-canary-42 now")]);
    let decided_by_fleet = |agent: &Agent, n: usize| -> Vec<serde_json::Value> {
        let records = agent.wait_for_records(|r| r["type"] == "llm_call", n, Duration::from_secs(20));
        records.into_iter().filter(|r| r["type"] == "llm_call").collect()
    };
    run_curl(mock.port, &marked).assert_responses(&marked);
    let calls = decided_by_fleet(&real, 1);
    let d = &calls[0]["decision"];
    assert!(
        d["rules"].as_array().unwrap().iter().any(|r| r == "fleet.inc42_marker"),
        "the fleet's rule decided: {d:#}"
    );
    assert!(d["packs"].as_array().unwrap().iter().any(|p| p["name"] == "fleet-inc-42"), "{d:#}");

    // A restart: the pack is in force again from the start.
    real.stop();
    let mut real = Agent::start_with_config(&toml);
    run_curl(mock.port, &marked).assert_responses(&marked);
    let calls = decided_by_fleet(&real, 1);
    assert!(
        calls[0]["decision"]["rules"].as_array().unwrap().iter().any(|r| r == "fleet.inc42_marker"),
        "after a restart: {:#}",
        calls[0]
    );

    // Version 2 without it: the marker is just text again.
    std::fs::write(dir.join("policy.toml"), "note = \"INC-42 closed\"\n").unwrap();
    sign_and_publish("2");
    fleet.wait_for_version(&["real".to_owned()], 2, Duration::from_secs(20));
    run_curl(mock.port, &marked).assert_responses(&marked);
    let calls = decided_by_fleet(&real, 2);
    let last = calls.last().unwrap();
    assert!(
        !last["decision"]["rules"].as_array().unwrap().iter().any(|r| r == "fleet.inc42_marker"),
        "version 2 took the pack away: {last:#}"
    );
    real.stop();
}

/// A policy served from a URL (`[fleet] url`, here `file://`: the same object_store code
/// path as `https://` and `s3://`) is taken when it changes, and a forged one there is
/// refused and counted like any.
#[test]
fn a_policy_polled_from_a_url_is_taken_when_it_changes() {
    let _serial = serial();
    require_root();
    let dir = TempDir::new("fleet-url");
    let mut fleet = Fleet::new(dir.path(), 1, &[]);
    let served = dir.path().join("served-policy.json");
    {
        let m = &fleet.members[0];
        let text = std::fs::read_to_string(&m.config).unwrap();
        let text = text.replace(
            "drop_dir = \"\"",
            &format!("drop_dir = \"\"\nurl = \"file://{}\"\npoll_secs = 1", served.display()),
        );
        std::fs::write(&m.config, text).unwrap();
    }
    fleet.start_all();
    let load = |p: &Path, name: &str| HostKey::load(p, name).unwrap();
    let (a, b) = (load(&fleet.signing_keys[0], "fleet-a"), load(&fleet.signing_keys[1], "fleet-b"));
    let now = aegis_agent::clock::now_unix_ms();
    let doc = |version: u64| PolicyDoc {
        doc_type: DOC_TYPE.into(),
        fleet: FLEET.into(),
        version,
        issued_at: aegis_agent::clock::rfc3339_ms(now),
        expires: aegis_agent::clock::rfc3339_ms(now + 3_600_000),
        blocks: vec![],
        emergency: version == 1,
        mode: None,
        rulepacks: vec![],
        drill: None,
        note: format!("v{version} from a URL"),
    };
    let wait_for = |what: &str, f: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = std::time::Instant::now() + scaled(Duration::from_secs(15));
        loop {
            let s = fleet.members[0].status();
            if f(&s) {
                return s;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: {s:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    std::fs::write(&served, serde_json::to_vec(&doc(1).sign(&[&a, &b]).unwrap()).unwrap()).unwrap();
    let s = wait_for("version 1 from the URL", &|s| s["fleet"]["version"] == 1);
    assert_eq!(s["emergency"]["host"], true, "{s:#}");
    assert!(s["fleet"]["sources"].as_array().unwrap().iter().any(|u| u.as_str().unwrap().starts_with("file://")));
    // A forged version 2 at the URL: refused, counted; version 1 stays.
    let mut forged = doc(2).sign(&[&a, &b]).unwrap();
    forged.payload = forged.payload.replace('A', "B");
    std::fs::write(&served, serde_json::to_vec(&forged).unwrap()).unwrap();
    wait_for("the forged version refused", &|s| {
        s["fleet"]["refused"]["bad_signature"].as_u64().unwrap_or(0)
            + s["fleet"]["refused"]["malformed"].as_u64().unwrap_or(0)
            == 1
    });
    // The real version 2: taken (emergency mode off again, the fleet had turned it on), with
    // a configuration override: enforcement on.
    assert_eq!(fleet.members[0].status()["mode"]["mode"], "observe");
    let mut v2 = doc(2);
    v2.mode = Some(aegis_agent::control::EnforceMode::Enforce);
    std::fs::write(&served, serde_json::to_vec(&v2.sign(&[&a, &b]).unwrap()).unwrap()).unwrap();
    let s = wait_for("version 2 from the URL", &|s| s["fleet"]["version"] == 2);
    assert_eq!(s["emergency"]["host"], false, "{s:#}");
    assert_eq!(s["mode"]["mode"], "enforce", "the policy's mode is in force: {s:#}");
    assert_eq!(s["mode"]["operator"]["set_by"]["comm"], "fleet v2", "and says who set it: {s:#}");
}
