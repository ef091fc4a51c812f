//! `aegis-agent drill` on the real kernel: every built-in scenario against a real agent
//! (observe mode, as shipped; containment on a test cgroup; metrics on), with the report
//! checked phase by phase, the records and incidents checked to be marked as the drill's,
//! and nothing left behind (no drill cgroup, no block, no emergency mode, no client). A
//! drill interrupted with SIGINT while its containment is in force lifts it too; one killed
//! with SIGKILL is cleaned up by the agent. And the issue's done-when: against the agent as
//! shipped (its embedded defaults), every phase of every built-in scenario passes.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aegis_tests::{
    Agent, ContainConfig, PinDir, TempDir, TestCgroup, agent_bin,
    collector::{Enrolled, Pki, agent, collector_toml, describe, free_port, start_collector},
    require_root, serial, workspace_dir,
};
use serde_json::Value;

/// The drift scenario needs an allowlist that does not approve its model.
const POLICY_PACK: &str = r#"
[pack]
name = "drill-test-policies"
version = "1"

[[policies]]
id = "policy.drill_test_models"
tenant = "*"
allow_providers = ["openai_compatible", "anthropic"]
allow_models = ["gpt-4o*", "claude-*"]
action = "block"
severity = "SEV-3"
rationale = "Only the vetted models."
"#;

struct Setup {
    // Dropped in this order: agent, pins, cgroup.
    agent: Agent,
    config: ContainConfig,
    _pins: PinDir,
    cgroup: TestCgroup,
}

fn setup(name: &str) -> Setup {
    setup_with(name, "")
}

fn setup_with(name: &str, extra_toml: &str) -> Setup {
    let cgroup = TestCgroup::new(name);
    let pins = PinDir::new(name);
    let default_pack = std::fs::read_to_string(workspace_dir().join("packaging/rules/default.toml")).unwrap();
    let config = ContainConfig::new(&cgroup, &pins)
        .shipped_mode()
        .pack("default.toml", &default_pack)
        .pack("policies.toml", POLICY_PACK);
    let toml = format!("{}\n[metrics]\nlisten = \"127.0.0.1:{}\"\n{extra_toml}", config.toml(), free_port());
    let agent = Agent::start_with_config(&toml);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(config.socket()).is_err() {
        assert!(Instant::now() < deadline, "the control socket does not answer{}", agent.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    Setup { agent, config, _pins: pins, cgroup }
}

/// The agent as shipped (`cargo xtask run`, the package's default config): its embedded
/// defaults (observe mode, the embedded pack without any `[[policies]]`, the content gate
/// on, no metrics listener, no collector), with only what a test on a shared host must move
/// set here: containment scoped to a test cgroup, and its files in temporary directories.
fn setup_shipped(name: &str) -> Setup {
    let cgroup = TestCgroup::new(name);
    let pins = PinDir::new(name);
    let config = ContainConfig::new(&cgroup, &pins).shipped_mode().gate(&[]);
    assert!(config.packs.is_empty(), "the embedded default pack");
    let toml = config.toml();
    assert!(!toml.contains("[metrics]") && !toml.contains("[collector]") && !toml.contains("mode ="), "{toml}");
    let agent = Agent::start_with_config(&toml);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(config.socket()).is_err() {
        assert!(Instant::now() < deadline, "the control socket does not answer{}", agent.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    Setup { agent, config, _pins: pins, cgroup }
}

/// The private directory (`$TMPDIR/aegis-<drill id>`) of drill `id`.
fn work_dir(id: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("aegis-{id}"))
}

/// Nothing of drill `id` is left on the host or in the agent: [`assert_nothing_left`], no
/// process in the test cgroup, no private directory, no drill in progress.
fn assert_nothing_left_of(s: &Setup, id: &str) {
    assert_nothing_left(s);
    let procs = std::fs::read_to_string(s.cgroup.path().join("cgroup.procs")).unwrap();
    assert!(procs.trim().is_empty(), "processes left in the test cgroup: {procs}");
    assert!(!work_dir(id).exists(), "the drill's directory {} is left", work_dir(id).display());
    let drills = drills_in_progress(s);
    assert_eq!(drills, Value::Array(vec![]), "drills still marked in the agent: {drills:#}");
}

/// The drills the agent has in progress (the answer to ending a drill that is not one).
fn drills_in_progress(s: &Setup) -> Value {
    use std::io::{BufRead as _, Write as _};
    let mut sock = std::os::unix::net::UnixStream::connect(s.config.socket()).unwrap();
    sock.write_all(b"{\"v\":1,\"op\":\"drill\",\"on\":false,\"id\":\"drill-probe\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(sock).read_line(&mut line).unwrap();
    let reply: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(reply["status"], "ok", "{reply:#}");
    reply["drills"].clone()
}

/// Waits (60 s at most) until `contained` holds for `blocks --json`, while the drill `child`
/// still runs.
fn wait_contained(s: &Setup, child: &mut std::process::Child, contained: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !contained(&s.config.blocks_json()) {
        assert!(Instant::now() < deadline, "the drill never contained{}", s.agent.logs());
        assert!(child.try_wait().unwrap().is_none(), "the drill ended before containing");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn drill_cmd(s: &Setup, args: &[&str]) -> Command {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("drill").args(args).arg("--config").arg(s.agent.config_path());
    cmd
}

/// Nothing of a drill is left: no drill cgroup, no block, no emergency mode.
fn assert_nothing_left(s: &Setup) {
    let cgroups = s.cgroup.children("aegis-drill-");
    assert!(cgroups.is_empty(), "drill cgroups left behind: {cgroups:?}");
    let blocks = s.config.blocks_json();
    assert_eq!(blocks["blocks"], Value::Array(vec![]), "blocks left behind: {blocks:#}");
    assert_eq!(blocks["emergency"]["cgroups"], Value::Array(vec![]), "emergency left on: {blocks:#}");
    assert_eq!(blocks["emergency"]["host"], false, "{blocks:#}");
}

#[test]
fn every_built_in_scenario_passes_every_phase_and_leaves_nothing_behind() {
    let _serial = serial();
    require_root();
    // A real collector over mutual TLS, which the drill's bundles must reach.
    let dir = TempDir::new("drill-collector");
    let pki = Pki::new(&dir.join("pki"), "ca");
    let client = pki.issue("aegis-test", &["aegis-test"]);
    let port = free_port();
    let collector_conf = format!(
        "[collector]\nurl = \"https://127.0.0.1:{port}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\nspool_dir = {:?}\n\
         backoff_max_secs = 1\n",
        pki.ca().display().to_string(),
        client.0.display().to_string(),
        client.1.display().to_string(),
        dir.join("spool").display().to_string(),
    );
    let s = setup_with("drill", &collector_conf);
    let config = s.agent.config_path();
    let shown = agent(&["key", "show", "--config", config.to_str().unwrap()]);
    assert!(shown.status.success(), "{}", describe(&shown));
    let verifier = String::from_utf8_lossy(&shown.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("verifier ").map(str::to_owned))
        .expect("key show prints the verifier");
    let cdir = dir.join("collector");
    std::fs::create_dir_all(&cdir).unwrap();
    let enrolled = [Enrolled { name: "aegis-test", verifier, client_identity: "aegis-test" }];
    let _collector = start_collector(&collector_toml(&cdir, &pki, port, &enrolled, ""), &cdir);
    let out_dir = TempDir::new("drill-report");
    let out =
        drill_cmd(&s, &["--report", out_dir.path().to_str().unwrap(), "--json"]).stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("the report is not JSON ({e}): {stderr}{}", s.agent.logs()));
    let id = report["drill"].as_str().unwrap().to_owned();
    let md = std::fs::read_to_string(out_dir.join(&format!("{id}.md"))).expect("the Markdown report");
    eprintln!("{md}");
    let scenarios = report["scenarios"].as_array().unwrap();
    let names: Vec<&str> = scenarios.iter().map(|s| s["scenario"].as_str().unwrap()).collect();
    assert_eq!(names, ["prompt-injection", "secret-leak", "unsafe-output", "policy-drift", "provider-failover"]);
    for sc in scenarios {
        let phases: Vec<&str> = sc["phases"].as_array().unwrap().iter().map(|p| p["phase"].as_str().unwrap()).collect();
        assert_eq!(phases, ["detect", "classify", "contain", "preserve", "stabilise", "recover"], "{sc:#}");
        for p in sc["phases"].as_array().unwrap() {
            assert_eq!(p["outcome"], "pass", "{} {}: {p:#}\n{md}{}", sc["scenario"], p["phase"], s.agent.logs());
            assert!(p["done_at_ms"].as_u64().unwrap() <= p["deadline_ms"].as_u64().unwrap());
        }
        assert!(sc["incident"].as_str().is_some_and(|i| i.starts_with("INC-")), "{sc:#}");
        assert!(!sc["bundles"].as_array().unwrap().is_empty(), "{sc:#}");
        let preserve = sc["phases"].as_array().unwrap().iter().find(|p| p["phase"] == "preserve").unwrap();
        let shipped = preserve["checks"].as_array().unwrap().iter().find(|c| c["name"] == "reaches the collector");
        assert_eq!(shipped.unwrap()["outcome"], "pass", "{preserve:#}");
        let control = &sc["controls"][0];
        assert!(control["applied"] == true && control["validated"] == true && control["lifted"] == true, "{sc:#}");
    }
    let sev = |name: &str| scenarios.iter().find(|s| s["scenario"] == name).unwrap()["severity"].clone();
    assert_eq!(sev("secret-leak"), "SEV-1");
    assert_eq!(sev("prompt-injection"), "SEV-2");
    assert_eq!(sev("policy-drift"), "SEV-3");
    assert_eq!(report["left_behind"], Value::Array(vec![]), "{report:#}");
    assert_eq!(report["passed"], true, "{md}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let json_report: Value =
        serde_json::from_slice(&std::fs::read(out_dir.join(&format!("{id}.json"))).unwrap()).unwrap();
    assert_eq!(json_report, report, "the file holds the printed report");
    assert!(md.contains(&format!("# Drill {id}: every phase passed")), "{md}");
    assert_nothing_left(&s);

    // Everything the drill caused is marked as the drill's.
    let drill_records: Vec<Value> = s
        .agent
        .records()
        .into_iter()
        .filter(|r| r["cgroup"].as_str().is_some_and(|c| c.contains("aegis-drill-")) || !r["drill"].is_null())
        .collect();
    assert!(drill_records.len() >= 15, "three calls per scenario at least: {drill_records:#?}");
    for r in &drill_records {
        assert_eq!(r["drill"], id.as_str(), "a drill record not marked: {r:#}");
    }
    assert!(drill_records.iter().any(|r| r["type"] == "connect_denied" && r["action"] == "redirect"));
    // The drill's incidents (the agent sees every process of this shared host: another
    // test's calls may open incidents of their own, outside the drill cgroup).
    let incidents = run_json(&s, &["incident", "list", "--json"]);
    let incidents: Vec<&Value> = incidents
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["scope"]["cgroup"].as_str().is_some_and(|c| c.contains("/aegis-drill-")))
        .collect();
    for i in &incidents {
        assert!(i["title"].as_str().unwrap().starts_with(&format!("[drill {id}]")), "{i:#}");
        assert_eq!(i["status"], "resolved", "{i:#}");
    }
    assert_eq!(incidents.len(), 5, "{incidents:#?}");
    // At the collector: the drill's bundles, listed by incident.
    let url = format!("https://127.0.0.1:{port}");
    let ca = pki.ca();
    for sc in scenarios {
        let incident = sc["incident"].as_str().unwrap();
        let out = agent(&[
            "evidence",
            "list",
            "--json",
            "--collector",
            &url,
            "--incident",
            incident,
            "--ca",
            ca.to_str().unwrap(),
            "--cert",
            client.0.to_str().unwrap(),
            "--key",
            client.1.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", describe(&out));
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(!listed["bundles"].as_array().unwrap().is_empty(), "{incident}: {listed:#}");
    }
    let history = drill_cmd(&s, &["history"]).output().unwrap();
    let history = String::from_utf8_lossy(&history.stdout);
    assert!(history.contains(&id) && history.contains(" pass "), "{history}");
}

#[test]
fn an_interrupted_drill_lifts_its_containment() {
    let _serial = serial();
    require_root();
    let s = setup("drill-int");
    let mut child = drill_cmd(&s, &["--scenario", "secret-leak", "--json", "--hold-contained-ms", "60000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until its block is in force, then interrupt it.
    wait_contained(&s, &mut child, |blocks| blocks["blocks"].as_array().is_some_and(|b| !b.is_empty()));
    let drill_cgroups = |dir: &Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("aegis-drill-"))
            .count()
    };
    assert_eq!(drill_cgroups(s.cgroup.path()), 1, "the drill's cgroup exists while it runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "an interrupted drill did not pass: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert!(report["stopped"].as_str().is_some_and(|s| s.contains("interrupted")), "{report:#}");
    assert_eq!(report["left_behind"], Value::Array(vec![]), "{report:#}");
    assert_nothing_left(&s);
    // The agent no longer takes that cgroup's calls for a drill's: its mark ended.
    let audit = s.config.audit_text();
    assert!(audit.contains("\"drill_end\""), "{audit}");
}

/// The issue's done-when: against the agent as shipped, one command runs every built-in
/// scenario and every phase of each passes (none skipped), with nothing left behind. The
/// drift scenario is seen through the drill's own allowlist (the shipped pack has no
/// `[[policies]]`), which rules the drill cgroup only and is gone once the drill ends.
#[test]
fn on_the_shipped_defaults_every_phase_of_every_scenario_passes() {
    let _serial = serial();
    require_root();
    let s = setup_shipped("drill-def");
    let out_dir = TempDir::new("drill-def-report");
    let out =
        drill_cmd(&s, &["--report", out_dir.path().to_str().unwrap(), "--json"]).stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("the report is not JSON ({e}): {stderr}{}", s.agent.logs()));
    let id = report["drill"].as_str().unwrap().to_owned();
    // The README's sample report is this one.
    eprintln!("{}", std::fs::read_to_string(out_dir.join(&format!("{id}.md"))).expect("the Markdown report"));
    let scenarios = report["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), 5, "{report:#}");
    for sc in scenarios {
        for p in sc["phases"].as_array().unwrap() {
            assert_eq!(p["outcome"], "pass", "{} {}: {p:#}\n{stderr}{}", sc["scenario"], p["phase"], s.agent.logs());
        }
        let control = &sc["controls"][0];
        assert!(control["applied"] == true && control["validated"] == true && control["lifted"] == true, "{sc:#}");
    }
    let drift = scenarios.iter().find(|s| s["scenario"] == "policy-drift").unwrap();
    assert_eq!(drift["signal"], "rule:drill.policy.policy-drift (policy, block)", "{drift:#}");
    assert_eq!(drift["severity"], "SEV-3", "{drift:#}");
    // Without a metrics listener, the stabilise phase reads the agent's records.
    let stabilise = &drift["phases"].as_array().unwrap()[4];
    assert_eq!(stabilise["checks"][0]["name"], "records show the change", "{stabilise:#}");
    assert_eq!(report["left_behind"], Value::Array(vec![]), "{report:#}");
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_nothing_left_of(&s, &id);
    // The drill's allowlist never ruled a call outside its cgroup.
    for r in s.agent.records() {
        let by_drill_policy = r["decision"]["rules"]
            .as_array()
            .is_some_and(|rules| rules.iter().any(|x| x.as_str().is_some_and(|x| x.starts_with("drill.policy."))));
        if by_drill_policy {
            assert_eq!(r["drill"], id.as_str(), "a record outside the drill ruled by its allowlist: {r:#}");
        }
    }
    let audit = std::fs::read_to_string(s.config.audit_log()).unwrap();
    assert!(audit.contains("drill.policy.policy-drift"), "the drill's allowlist is audited: {audit}");

    // Several hosts' reports as one (here the same report twice, and a file that is not one).
    let json = out_dir.join(&format!("{id}.json"));
    let out = Command::new(agent_bin()).args(["drill", "aggregate", "--json"]).arg(&json).arg(&json).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["hosts"], 2, "{summary:#}");
    assert_eq!(summary["phases"].as_array().unwrap().len(), 5 * 6, "{summary:#}");
    for p in summary["phases"].as_array().unwrap() {
        assert_eq!((p["hosts"].as_u64(), p["passed"].as_u64()), (Some(2), Some(2)), "{p:#}");
        assert!(p["p50_ms"].as_u64().unwrap() <= p["p99_ms"].as_u64().unwrap(), "{p:#}");
    }
    let bad = out_dir.join("not-a-report.json");
    std::fs::write(&bad, "{\"drill\": 1}").unwrap();
    let out = Command::new(agent_bin()).args(["drill", "aggregate"]).arg(&json).arg(&bad).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not-a-report.json") && stderr.contains("left out"), "{stderr}");
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(md.starts_with("# Drill across 1 hosts: 1 passed, 0 failed"), "{md}");
}

/// A drill killed with SIGKILL (no guard runs) while its emergency mode is in force: the
/// agent sees its command is gone and lifts emergency mode for the drill cgroup, the
/// drill's mark and the cgroup itself (killing the client in it); the next drill removes
/// the killed one's private directory.
#[test]
fn a_drill_killed_with_sigkill_is_cleaned_up_by_the_agent() {
    let _serial = serial();
    require_root();
    let s = setup_shipped("drill-kill");
    let mut child = drill_cmd(&s, &["--scenario", "prompt-injection", "--json", "--hold-contained-ms", "60000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_contained(&s, &mut child, |blocks| blocks["emergency"]["cgroups"].as_array().is_some_and(|c| !c.is_empty()));
    let name = std::fs::read_dir(s.cgroup.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("aegis-drill-"))
        .expect("the drill's cgroup exists while it runs");
    let id = format!("drill-{}", name.trim_start_matches("aegis-drill-"));
    assert!(work_dir(&id).exists(), "the drill's directory exists while it runs");
    assert_eq!(drills_in_progress(&s).as_array().unwrap().len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    // The agent notices within its expiry tick (1 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let blocks = s.config.blocks_json();
        let lifted = blocks["emergency"]["cgroups"] == Value::Array(vec![])
            && !s.cgroup.path().join(&name).exists()
            && drills_in_progress(&s) == Value::Array(vec![]);
        if lifted {
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not lift the killed drill: {blocks:#}{}", s.agent.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_nothing_left(&s);
    let audit = std::fs::read_to_string(s.config.audit_log()).unwrap();
    assert!(audit.contains("ended without ending the drill") && audit.contains("\"stale\":true"), "{audit}");
    // The next drill passes, and removes the killed drill's directory.
    let out = drill_cmd(&s, &["--scenario", "provider-failover", "--json"]).stdin(Stdio::null()).output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", String::from_utf8_lossy(&out.stderr), s.agent.logs()));
    assert_eq!(report["passed"], true, "{report:#}");
    assert_nothing_left_of(&s, &id);
    assert_nothing_left_of(&s, report["drill"].as_str().unwrap());
}

fn run_json(s: &Setup, args: &[&str]) -> Value {
    let out = Command::new(agent_bin()).args(args).arg("--config").arg(s.agent.config_path()).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}
