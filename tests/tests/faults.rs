//! Faults the agent must survive without a silent loss, on the real kernel with real
//! clients: a full disk under the records file, and a ring buffer too small for the traffic.
//! Each test asserts what is kept and what is reported.
//!
//! Disks are tmpfs instances mounted for the test in a temporary directory and unmounted at
//! the end; traffic goes to a local mock on 127.0.0.1.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use aegis_tests::{Agent, MockProvider, Plan, Request, TempCert, require_root, run_python, serial};
use serde_json::{Value, json};

/// A tmpfs of `size` mounted for the test, unmounted (and its directory removed) on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn new(name: &str, size: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("aegis-faults-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("running mount");
        assert!(ok.success(), "mounting a test tmpfs on {}", dir.display());
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn chat(i: usize) -> Request {
    Request::post(
        "/v1/chat/completions",
        json!({"model": format!("faults-model-{i}"), "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    )
}

/// Every line of the file is a whole JSON record.
fn file_records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "the records file ends in a partial line");
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}"))).collect()
}

#[test]
fn a_full_disk_loses_no_record_silently() {
    let _serial = serial();
    require_root();
    let cert = TempCert::generate();
    let mock = MockProvider::start(&cert);
    let disk = SmallDisk::new("records", "256k");
    let records = disk.path().join("calls.jsonl");
    // A queue of 8 KiB holds a few records (each is about 1.5 KiB), not all of them.
    let mut agent = Agent::start_writing_to("[output]\nmax_pending_bytes = 8192\n", Some(records.clone()));
    // Fill the disk but for a few records.
    let filler = disk.path().join("filler");
    std::fs::write(&filler, vec![b'x'; 248 * 1024]).unwrap();

    let calls = 30;
    let plan = Plan::single((0..calls).map(chat).collect());
    let run = run_python(mock.port, &plan);
    run.assert_responses(&plan);
    std::thread::sleep(Duration::from_secs(2));
    assert!(agent.logs().contains("cannot write output.file"), "the failure is logged when it starts{}", agent.logs());
    // Space again; the next retry writes what was held and says what was lost.
    std::fs::remove_file(&filler).unwrap();
    let pid = u64::from(run.pid());
    let mine = |r: &Value| r["type"] == "llm_call" && r["pid"].as_u64() == Some(pid);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let all = file_records(&records);
        if all.iter().any(|r| r["type"] == "records_lost") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no records_lost record after the disk had space{}",
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.stop();
    let all = file_records(&records);
    let kept = all.iter().filter(|r| mine(r)).count() as u64;
    let lost: u64 = all.iter().filter(|r| r["type"] == "records_lost").filter_map(|r| r["count"].as_u64()).sum();
    assert!(lost > 0 && kept > 0, "kept {kept}, lost {lost}{}", agent.logs());
    assert_eq!(kept + lost, calls as u64, "every call is a record in the file or counted as lost{}", agent.logs());
    let logs = agent.logs();
    assert!(logs.contains("output.file takes writes again"), "{logs}");
    assert!(logs.contains(&format!("records_lost={lost}")), "the final report counts them: {logs}");
    // The failure is logged when it starts and when it ends, not every pass of the loop.
    assert_eq!(logs.matches("cannot write output.file").count(), 1, "{logs}");
}
