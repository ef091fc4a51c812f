//! Kernel capabilities load and fail on their own, on the real kernel, through the daemon:
//! a capability that cannot come up is reported (status, with its reason) and the rest of
//! the agent runs; a capability the configuration requires stops the start instead, saying
//! which and why. The fault is a real one: the pin directory of the connect programs is not
//! on bpffs, so destination blocks cannot be installed.
//!
//! Each test makes its own cgroup and pin directory and talks to 127.0.0.1 only.

use std::time::Duration;

use aegis_tests::{
    ContainConfig, MockProvider, PinDir, Plan, Request, TempCert, TestCgroup, agent_bin, require_root, serial,
};
use serde_json::{Value, json};

fn config_without_bpffs(cg: &TestCgroup, pins: &PinDir, gate_port: u16) -> ContainConfig {
    let mut cfg = ContainConfig::new(cg, pins).gate(&[gate_port]);
    // A plain directory: the connect programs cannot be pinned there.
    cfg.pin_dir = cfg.dir().join("plain-dir/aegis");
    cfg
}

fn status_json(cfg: &ContainConfig) -> Value {
    let out = cfg.ctl_ok(&["status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}"))
}

fn capability<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["capabilities"]
        .as_array()
        .and_then(|caps| caps.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("status lists no {name}: {status:#}"))
}

#[test]
fn a_capability_that_cannot_load_is_reported_and_the_rest_runs() {
    let _serial = serial();
    require_root();
    let cert = TempCert::generate();
    let cg = TestCgroup::new("caps-alone");
    let pins = PinDir::new("caps-alone");
    let mock = MockProvider::start(&cert);
    let cfg = config_without_bpffs(&cg, &pins, mock.port);
    let agent = cfg.start_agent();

    let status = status_json(&cfg);
    let blocks = capability(&status, "destination_blocks");
    assert_eq!(blocks["state"], "unavailable", "{status:#}");
    assert!(blocks["reason"].as_str().unwrap_or("").contains("is not on bpffs"), "{blocks:#}");
    assert!(blocks["impact"].as_str().unwrap_or("").contains("do not refuse connects"), "{blocks:#}");
    for name in ["capture", "connection_kills", "content_gate"] {
        assert_eq!(capability(&status, name)["state"], "active", "{name}: {status:#}");
    }
    assert!(!status["kernel"].as_str().unwrap_or("").is_empty(), "{status:#}");
    let text = cfg.ctl_ok(&["status"]);
    assert!(text.contains("destination_blocks") && text.contains("unavailable") && text.contains("means:"), "{text}");
    assert!(
        agent.logs().contains("kernel capability not fully available"),
        "the log says it once, at start{}",
        agent.logs()
    );

    // Capture still sees calls.
    let plan = Plan::single(vec![Request::post(
        "/v1/chat/completions",
        json!({"model": "caps-model", "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    )]);
    let run = cg.run(aegis_tests::Client::Python, mock.port, &plan).assert_ok(&agent.logs());
    let pid = u64::from(run.pid());
    let records = agent.wait_for_records(
        |r| r["type"] == "llm_call" && r["pid"].as_u64() == Some(pid),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(records[0]["model"], "caps-model", "{:#}", records[0]);

    // A block is still taken, and says what it cannot do here.
    let dest = format!("127.0.0.1:{}", mock.port);
    let (id, summary) = cfg.block(&["--dest", &dest, "--cgroup", cg.rel(), "--reason", "it: caps"]);
    assert!(summary.contains("destination blocks are unavailable on this host"), "{summary}");
    cfg.ctl_ok(&["unblock", &id]);
}

#[test]
fn a_required_capability_that_cannot_load_stops_the_start() {
    let _serial = serial();
    require_root();
    let cg = TestCgroup::new("caps-required");
    let pins = PinDir::new("caps-required");
    let cfg = config_without_bpffs(&cg, &pins, 8443);
    let toml = format!("{}\n[capabilities]\nrequire = [\"capture\", \"destination_blocks\"]\n", cfg.toml());
    let path = cfg.dir().join("agent.toml");
    std::fs::write(&path, toml).unwrap();
    let out = std::process::Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("running the agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent must refuse to start: {err}");
    assert!(err.contains("required kernel capabilities are not available on this host"), "{err}");
    assert!(err.contains("destination_blocks is unavailable") && err.contains("is not on bpffs"), "{err}");
    assert!(err.contains("capabilities.require"), "{err}");
    // It left nothing behind: no control socket, no pinned state.
    assert!(!cfg.socket().exists(), "control socket left at {}", cfg.socket().display());
    assert!(pins.entries().is_empty(), "{:?}", pins.entries());
}
