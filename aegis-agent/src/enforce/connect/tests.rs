//! Real-kernel tests: each in its own child cgroup and its own pin directory, both removed
//! by guards also when the test fails. Traffic goes to loopback only.

use std::{
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use super::*;

/// A child cgroup made for the test and removed at the end, also on failure.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(name: &str) -> Self {
        let root = cgroup2_root().expect("cgroup v2 is mounted");
        Self::at(root.join(format!("aegis-test-{name}-{}", std::process::id())))
    }

    fn at(dir: PathBuf) -> Self {
        std::fs::create_dir(&dir).expect("creating a test cgroup (needs root)");
        Self(dir)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A pin directory for the test; whatever is pinned there is detached and removed at the
/// end. Declare it after the cgroup so that it goes first.
struct TestPins(PathBuf);

impl TestPins {
    fn new(name: &str) -> Self {
        Self(PathBuf::from(format!("/sys/fs/bpf/aegis-test-{name}-{}", std::process::id())))
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if let Err(e) = remove_pinned(&self.0) {
            eprintln!("cleanup of {}: {e:#}", self.0.display());
        }
    }
}

/// The real python binary (pyenv's `python3` is a shell shim).
fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import os, sys; print(os.path.realpath(sys.executable))"])
            .output()
            .expect("python3 is installed");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// Run `script` with `exe` (a python) inside `cgroup`; its output lines.
fn run_in(cgroup: &Path, exe: &Path, script: &str) -> Vec<String> {
    let procs = cgroup.join("cgroup.procs");
    let mut cmd = Command::new(exe);
    cmd.arg("-c").arg(script);
    // SAFETY: only a write(2) to a path prepared before fork.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, b"0"));
    }
    let out = cmd.output().expect("running python");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// A TCP connect from inside `cgroup` to each loopback port; the errno of each (0: ok).
fn connect_with(cgroup: &Path, exe: &Path, ports: &[u16]) -> Vec<i32> {
    let script = format!(
        "import socket\nfor p in {ports:?}:\n    s = socket.socket()\n    print(s.connect_ex(('127.0.0.1', p)))\n    s.close()\n"
    );
    run_in(cgroup, exe, &script).iter().map(|l| l.trim().parse().unwrap()).collect()
}

fn connect_from(cgroup: &Path, ports: &[u16]) -> Vec<i32> {
    connect_with(cgroup, python(), ports)
}

fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn net(s: &str) -> IpNet {
    let (a, p) = s.split_once('/').unwrap();
    IpNet::new(a.parse().unwrap(), p.parse().unwrap()).unwrap()
}

fn deny(id: u32, n: &str, port: Option<u16>, scope: RuleScope) -> DestRule {
    DestRule { id, net: net(n), port, scope, action: RuleAction::Deny, expires: None }
}

fn open(cg: &TestCgroup, pins: &TestPins, fail: FailMode) -> (ConnectGuard, Adopted) {
    ConnectGuard::open(&cg.0, &pins.0, fail).expect("opening the guard on the test cgroup")
}

const EPERM: i32 = libc::EPERM;
const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[test]
fn port_rule_and_every_port_rule_coexist_on_one_prefix_inside_the_cgroup_only() {
    let cg = TestCgroup::new("ports");
    let pins = TestPins::new("ports");
    let (_l1, bp) = listener();
    let (_l2, op) = listener();
    let (mut guard, adopted) = open(&cg, &pins, FailMode::Closed);
    assert_eq!(adopted, Adopted::default());

    guard.set_rules(&[deny(7, "127.0.0.1/32", Some(bp), RuleScope::Any)]).unwrap();
    assert_eq!(connect_from(&cg.0, &[bp, op]), [EPERM, 0]);
    // This test process is outside the cgroup: unaffected.
    TcpStream::connect(("127.0.0.1", bp)).expect("outside the cgroup a connect still works");
    let d = guard.denials();
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!((d[0].block_id, d[0].port, d[0].addr, d[0].action, d[0].sendmsg), (7, bp, LO, DenialAction::Denied, false));
    assert!(d[0].comm.starts_with("python"), "{d:?}");

    // An every-port rule on a covering prefix next to the port rule: both hold.
    let both = [deny(7, "127.0.0.1/32", Some(bp), RuleScope::Any), deny(8, "127.0.0.0/8", None, RuleScope::Any)];
    let report = guard.set_rules(&both).unwrap();
    assert_eq!((report.added, report.unchanged, report.removed), (2, 2, 0), "{report:?}");
    assert_eq!(connect_from(&cg.0, &[bp, op]), [EPERM, EPERM]);
    let ids: Vec<u32> = guard.denials().iter().map(|d| d.block_id).collect();
    assert_eq!(ids, [7, 8]);

    // The every-port rule scoped to a cgroup the caller is not in: only the port rule.
    let other = TestCgroup::new("ports-other");
    let scoped = [
        deny(7, "127.0.0.1/32", Some(bp), RuleScope::Any),
        deny(8, "127.0.0.0/8", None, RuleScope::Cgroup(other.0.clone())),
    ];
    guard.set_rules(&scoped).unwrap();
    assert_eq!(connect_from(&cg.0, &[bp, op]), [EPERM, 0]);
    assert_eq!(guard.counters().unwrap().denied, 4);

    guard.remove().unwrap();
    assert!(!pins.0.exists());
    assert_eq!(connect_from(&cg.0, &[bp, op]), [0, 0]);
}
