//! Log rotation as packaging/aegis-agent.logrotate does it: the records file and the audit
//! log are renamed, the agent gets SIGHUP, and what it writes next goes to new files at
//! the original paths while the renamed ones end with whole lines.

use std::{path::Path, process::Command, time::Duration};

use aegis_tests::{Agent, MockProvider, Plan, TempCert, agent_bin, plans, require_root, run_python, serial};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

/// Every line of `path`, which must end with a newline (no line cut in two), parsed.
fn whole_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.ends_with('\n'), "{} ends in a partial line: {text:?}", path.display());
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))).collect()
}

/// `aegis-agent ARGS --socket` the agent's control socket; must succeed.
fn ctl(agent: &Agent, args: &[&str]) {
    let out = Command::new(agent_bin())
        .args(args)
        .arg("--socket")
        .arg(agent.dir().join("control.sock"))
        .output()
        .expect("running aegis-agent");
    assert!(out.status.success(), "{args:?}: {out:?}{}", agent.logs());
}

/// One call with `model`, and its record in the agent's records file.
fn call(agent: &Agent, mock: &MockProvider, model: &str) {
    let plan = Plan::single(vec![plans::openai_chat(model, "What is the capital of France?")]);
    let run = run_python(mock.port, &plan);
    run.assert_responses(&plan);
    agent.wait_for_records(|r| r["type"] == "llm_call" && r["model"] == model, 1, Duration::from_secs(20));
}

#[test]
fn sighup_reopens_the_records_file_and_the_audit_log_at_their_paths() {
    require_root();
    let _serial = serial();
    let cert = TempCert::generate();
    let mock = MockProvider::start(&cert);
    let mut agent = Agent::start();
    let records = agent.output_path().to_owned();
    let audit = agent.dir().join("audit.jsonl");

    call(&agent, &mock, "before-rotation");
    // An audited change that containment off (the test config) still takes.
    ctl(&agent, &["enforce", "off"]);
    let audit_before = std::fs::read_to_string(&audit).unwrap();
    let rotated_records = agent.dir().join("calls.jsonl.1");
    let rotated_audit = agent.dir().join("audit.jsonl.1");
    std::fs::rename(&records, &rotated_records).unwrap();
    std::fs::rename(&audit, &rotated_audit).unwrap();
    kill(Pid::from_raw(agent.pid() as i32), Signal::SIGHUP).unwrap();

    // After the signal: new files at the original paths take what comes next.
    call(&agent, &mock, "after-rotation");
    ctl(&agent, &["enforce", "off"]);
    let now = whole_lines(&records);
    assert!(now.iter().any(|r| r["model"] == "after-rotation"), "{now:#?}");
    assert!(!now.iter().any(|r| r["model"] == "before-rotation"), "{now:#?}");
    let now_audit = whole_lines(&audit);
    assert!(!now_audit.is_empty() && now_audit.iter().all(|l| l["action"] == "enforce_off"), "{now_audit:#?}");
    assert!(now_audit.iter().any(|l| l["result"] == "ok"), "{now_audit:#?}");

    // The renamed files end with whole lines: what was written before the signal.
    let old = whole_lines(&rotated_records);
    assert!(old.iter().any(|r| r["model"] == "before-rotation"), "{old:#?}");
    assert!(!old.iter().any(|r| r["model"] == "after-rotation"), "{old:#?}");
    let old_audit = whole_lines(&rotated_audit);
    assert!(old_audit.iter().any(|l| l["action"] == "enforce_off"), "{old_audit:#?}");
    assert_eq!(std::fs::read_to_string(&rotated_audit).unwrap(), audit_before, "nothing after the signal");

    assert!(agent.logs().contains("output.file reopened"), "{}", agent.logs());
    agent.stop();
}
