//! `aegis-agent drill --fleet`: a drill published to a fleet through the collector, run by
//! each agent on its own host, the signed results gathered and aggregated. One real agent
//! (its kernel programs, containment on a test cgroup, the agent as shipped but for the
//! fleet's tables) runs the drill and passes every phase; two `run --no-kernel` agents
//! answer `not_run` and say why (they capture nothing); the command exits 1 because not
//! every host passed, writes the aggregate and each host's report, and nothing is left.

use std::{process::Command, time::Duration};

use aegis_agent::{
    collector::client::{ClientError, CollectorClient},
    evidence::key::HostKey,
    fleet::drill::{DrillResult, DrillStatus},
};
use aegis_tests::{
    Agent, ContainConfig, PinDir, TempDir, TestCgroup, agent_bin, fleet::Fleet, require_root, scaled, serial,
};
use serde_json::Value;

#[test]
fn a_fleet_drill_runs_on_every_agent_and_the_results_come_back_signed_and_aggregated() {
    let _serial = serial();
    require_root();
    let dir = TempDir::new("fleet-drill");
    let cg = TestCgroup::new("fleet-drill");
    let pins = PinDir::new("fleet-drill");
    let cfg = ContainConfig::new(&cg, &pins).shipped_mode().gate(&[]);
    let real_key = cfg.dir().join("host.key");
    HostKey::load_or_create(&real_key, "aegis-test").unwrap();
    let mut fleet = Fleet::new(dir.path(), 2, &[("real", &real_key, "aegis-test")]);
    let real_toml = fleet.extra_member_toml("real", cfg.dir(), None);
    let real = Agent::start_with_config(&format!("{}\n{real_toml}", cfg.toml()));
    fleet.start_all();
    fleet.wait_for_contact(vec!["agent-000".into(), "agent-001".into(), "real".into()]);

    let report_dir = TempDir::new("fleet-drill-report");
    let mut args: Vec<String> = vec!["drill".into(), "--scenario".into(), "prompt-injection".into()];
    args.extend(fleet.signing_args());
    args.extend(fleet.collector_args());
    args.extend(["--deadline".into(), format!("{}s", scaled(Duration::from_secs(240)).as_secs())]);
    args.extend(["--report".into(), report_dir.path().display().to_string(), "--json".into()]);
    let out = Command::new(agent_bin()).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("the fleet report is not JSON ({e}): {stderr}{}", real.logs()));
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    let id = report["drill"].as_str().unwrap().to_owned();
    assert!(id.starts_with("fleet-drill-"), "{report:#}");
    assert_eq!(report["policy_version"], 1, "{report:#}");
    assert_eq!(report["hosts"], 3, "{report:#}");
    assert_eq!(report["passed"], serde_json::json!(["real"]), "{report:#}\n{stderr}{}", real.logs());
    assert_eq!(report["failed"], serde_json::json!([]), "{report:#}");
    assert_eq!(report["not_reported"], serde_json::json!([]), "{report:#}");
    let not_run = report["not_run"].as_array().unwrap();
    assert_eq!(not_run.len(), 2, "{report:#}");
    for n in not_run {
        assert_eq!(n["status"], "not_run", "{n:#}");
        assert!(n["reason"].as_str().unwrap().contains("--no-kernel"), "{n:#}");
    }
    // Not every host passed: exit 1.
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // The real host's phases, aggregated: all six ran and passed.
    let phases = report["summary"]["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 6, "{report:#}");
    for p in phases {
        assert_eq!(p["scenario"], "prompt-injection", "{p:#}");
        assert_eq!((p["hosts"].as_u64(), p["passed"].as_u64()), (Some(1), Some(1)), "{p:#}");
    }
    // The files: the aggregate (JSON and Markdown) and the real host's own report.
    let md = std::fs::read_to_string(report_dir.join(&format!("{id}.md"))).unwrap();
    assert!(md.starts_with(&format!("# Fleet drill {id} on fleet it-fleet: NOT every host passed")), "{md}");
    assert!(md.contains("`agent-000` not_run: this agent runs with --no-kernel"), "{md}");
    let host: Value =
        serde_json::from_str(&std::fs::read_to_string(report_dir.join(&format!("{id}/real.json"))).unwrap()).unwrap();
    assert_eq!(host["passed"], true, "{host:#}");
    assert_eq!(host["host"], "real", "{host:#}");
    // The real agent ran it as its own drill: in its history, nothing left behind.
    assert_eq!(host["left_behind"], Value::Array(vec![]), "{host:#}");
    let cgroups = cg.children("aegis-drill-");
    assert!(cgroups.is_empty(), "drill cgroups left behind: {cgroups:?}");
    assert!(!std::env::temp_dir().join(format!("aegis-{id}")).exists(), "the fleet drill's directory is left");
    let blocks = cfg.blocks_json();
    assert_eq!(blocks["blocks"], Value::Array(vec![]), "blocks left behind: {blocks:#}");
    assert_eq!(blocks["emergency"]["cgroups"], Value::Array(vec![]), "{blocks:#}");
    // Every agent acknowledged the policy that carried it, the real one noting the drill.
    let status = fleet.status();
    let real_row = status["agents"].as_array().unwrap().iter().find(|a| a["agent"] == "real").unwrap().clone();
    assert_eq!(real_row["version"], 1, "{real_row:#}");

    // A forged result: agent-000's key claims a pass, sent over agent-001's certificate;
    // and one signed by a key the collector never enrolled. Both refused, nothing recorded.
    let forged = DrillResult {
        fleet: "it-fleet".into(),
        host: "agent-000".into(),
        drill: id.clone(),
        policy_version: 1,
        status: DrillStatus::Passed,
        reason: String::new(),
        received_unix_ms: 1,
        finished_unix_ms: 2,
        report: None,
    };
    let key000 = HostKey::load(&fleet.members[0].dir.join("host.key"), "agent-000").unwrap();
    let stranger = HostKey::load(&fleet.stranger_key, "stranger").unwrap();
    let cert001 = fleet.pki.issue("agent-001-again", &["agent-001.fleet.test"]);
    let client = CollectorClient::new(
        &format!("https://127.0.0.1:{}", fleet.port),
        &fleet.pki.ca(),
        Some((&cert001.0, &cert001.1)),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for (key, error) in [(&key000, "wrong_client"), (&stranger, "unknown_agent")] {
        let body = serde_json::to_vec(&forged.sign(key).unwrap()).unwrap();
        match rt.block_on(client.drill_result(body.into())) {
            Err(ClientError::Refused { status: 403, error: e, .. }) => assert_eq!(e, error),
            other => panic!("a forged drill result is refused ({error}), got {other:?}"),
        }
    }
    let after = rt.block_on(fleet_client(&fleet).drill_results(&id)).unwrap();
    let row = after["results"].as_array().unwrap().iter().find(|r| r["agent"] == "agent-000").unwrap().clone();
    assert_eq!(row["result"]["status"], "not_run", "the forgery changed nothing: {row:#}");

    // The drill request is not carried to the next version: a later push runs no drill.
    let out = fleet.push(&["emergency", "off", "--reason", "it: after the drill"], "30s");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let status = fleet.status();
    assert_eq!(status["policy"]["version"], 2, "{status:#}");
    std::thread::sleep(Duration::from_secs(2));
    let drills_run = real.logs().matches("fleet drill started on this host").count();
    assert_eq!(drills_run, 1, "one drill, once{}", real.logs());
}

/// The operator's client of the fleet's collector.
fn fleet_client(fleet: &Fleet) -> CollectorClient {
    let (cert, key) = &fleet.operator;
    CollectorClient::new(&format!("https://127.0.0.1:{}", fleet.port), &fleet.pki.ca(), Some((cert, key))).unwrap()
}
