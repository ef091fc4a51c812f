//! The agent's life cycle on the real kernel: start-up errors that say what to do, and a
//! clean stop on SIGINT/SIGTERM that detaches every probe and flushes open calls.

use std::{
    fs,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aegis_tests::{Agent, MockProvider, TempCert, agent_bin, plans, require_root, run_python, serial};

/// Runs `aegis-agent run` with `config` (TOML text) and returns its output; the agent is
/// expected to refuse to start.
fn run_refused(config: &str, wrap: &[&str]) -> Output {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("aegis-lifecycle-{}-{n}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("agent.toml");
    fs::write(
        &path,
        format!("{}{}{config}", aegis_tests::test_control_toml(&dir), aegis_tests::test_evidence_toml(&dir)),
    )
    .unwrap();
    let bin = agent_bin();
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let out = cmd.arg("run").arg("--config").arg(&path).stdin(Stdio::null()).output().expect("starting the agent");
    fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success(), "the agent should have refused to start: {out:?}");
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Ids of the eBPF programs process `pid` holds (its descriptors' `prog_id`).
fn programs_of(pid: u32) -> Vec<u32> {
    let dir = fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("reading the agent's fdinfo");
    dir.flatten()
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .filter_map(|info| info.lines().find_map(|l| l.strip_prefix("prog_id:").map(|v| v.trim().parse().ok()))?)
        .collect()
}

/// Whether the kernel still has program `id` (`bpftool prog show id N` fails once it is gone).
fn program_loaded(id: u32) -> bool {
    let out = Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .expect("bpftool (xtask setup installs it)");
    out.status.success()
}

#[test]
fn not_root_is_refused_with_instructions() {
    require_root();
    // setpriv drops to nobody; the agent must say why it cannot run, not fail in the kernel.
    let out = run_refused("", &["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]);
    let err = stderr(&out);
    assert!(err.contains("must run as root") && err.contains("sudo"), "{err}");
}

#[test]
fn no_tls_library_is_refused_with_instructions() {
    require_root();
    let out = run_refused(
        "[capture]\ndiscover = false\nlibraries = []\nexecutables = []\n[output]\nstdout = false\nfile = \"\"\n",
        &[],
    );
    let err = stderr(&out);
    assert!(err.contains("no OpenSSL library found") && err.contains("capture.libraries"), "{err}");
    assert!(err.contains("required kernel capabilities") && err.contains("capture is unavailable"), "{err}");
}

#[test]
fn bad_config_names_the_key() {
    let out = run_refused("[capture]\nring_bufer_bytes = 4096\n", &[]);
    let err = stderr(&out);
    assert!(err.contains("ring_bufer_bytes") && err.contains("agent.toml"), "{err}");
}

#[test]
fn sigterm_detaches_every_probe_and_flushes() {
    let _guard = serial();
    require_root();
    let cert = TempCert::generate();
    let mut agent = Agent::start();
    // Other processes on the host may load programs of the same names: follow the agent's own.
    let held = programs_of(agent.pid());
    assert!(held.len() >= 9, "the agent holds {} programs while running{}", held.len(), agent.logs());
    assert!(held.iter().all(|id| program_loaded(*id)));
    let mock = MockProvider::start(&cert);
    let plan = aegis_tests::Plan::single(plans::common_requests());
    let run = run_python(mock.port, &plan);
    run.assert_responses(&plan);
    // No wait: whatever the agent still holds must be flushed by the stop.
    let status = agent.terminate_with(nix::sys::signal::Signal::SIGTERM);
    assert!(status.success(), "agent exited with {status} after SIGTERM{}", agent.logs());
    let records = agent.records();
    assert!(
        records.iter().any(|r| r["pid"].as_u64() == Some(u64::from(run.pid()))),
        "no record of the client's calls after SIGTERM{}",
        agent.logs()
    );
    assert!(agent.logs().contains("all probes detached"), "{}", agent.logs());
    // The kernel drops programs once their last reference (the agent's) is gone.
    let deadline = Instant::now() + aegis_tests::scaled(Duration::from_secs(10));
    loop {
        let left: Vec<u32> = held.iter().copied().filter(|id| program_loaded(*id)).collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "programs {left:?} still loaded after the agent stopped");
        std::thread::sleep(Duration::from_millis(200));
    }
}
