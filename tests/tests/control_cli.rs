//! The control commands as operators run them: the real `aegis-agent` binary, its exit
//! status and its messages. (Runs against a live agent belong to the daemon's tests.)

use std::process::{Command, Output};

use aegis_tests::{TempDir, agent_bin};

fn agent(args: &[&str]) -> Output {
    Command::new(agent_bin()).args(args).output().expect("starting aegis-agent")
}

#[test]
fn no_agent_is_exit_3_and_says_so() {
    let dir = TempDir::new("ctl-cli");
    let socket = dir.join("control.sock");
    let out = agent(&["blocks", "--socket", socket.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "aegis-agent blocks: cannot reach the agent at {}: no control socket there; is the agent running?",
            socket.display()
        )),
        "{stderr}"
    );

    // The socket named by the agent's config file.
    let config = dir.join("agent.toml");
    std::fs::write(&config, format!("[control]\nsocket = {:?}\n", socket.display().to_string())).unwrap();
    let out = agent(&["status", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&socket.display().to_string()), "{out:?}");
}

/// 64 (EX_USAGE), whether clap or the command found the mistake: 2 is `scan`'s block.
#[test]
fn usage_errors_are_exit_64() {
    for args in [
        &["block", "--provider", "openai"][..],
        &["block", "--provider", "openai", "--dest", "10.0.0.1", "--reason", "r"],
        &["block", "--dest", "api.openai.com", "--reason", "r"],
        &["emergency", "maybe"],
        &["block", "--provider", "openai", "--exe", "python3", "--reason", "r", "--socket", "/nonexistent/s"],
    ] {
        let out = agent(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    }
}
