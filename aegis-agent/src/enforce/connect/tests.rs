//! Real-kernel tests: each in its own child cgroup and its own pin directory, both removed
//! by guards also when the test fails. Traffic goes to loopback only.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    thread,
    time::{Duration, Instant, SystemTime},
};

use super::*;

/// A child cgroup made for the test and removed at the end, also on failure.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(name: &str) -> Self {
        let root = cgroup2_root().expect("cgroup v2 is mounted");
        Self::at(root.join(format!("aegis-test-{name}-{}", std::process::id())))
    }

    fn child(&self, name: &str) -> Self {
        Self::at(self.0.join(name))
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

/// A pin directory for the test, in a bpffs instance mounted for the test alone (nothing
/// shows in the host's /sys/fs/bpf); whatever is pinned there is detached and removed, and
/// the instance unmounted, at the end. Declare it after the cgroup so that it goes first.
struct TestPins(PathBuf);

impl TestPins {
    fn new(name: &str) -> Self {
        let mount = std::env::temp_dir().join(format!("aegis-test-bpffs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&mount).expect("creating the bpffs mount point");
        let out = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&mount).output().expect("running mount");
        assert!(out.status.success(), "mounting bpffs: {}", String::from_utf8_lossy(&out.stderr));
        Self(mount.join("pins"))
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if let Err(e) = remove_pinned(&self.0) {
            eprintln!("cleanup of {}: {e:#}", self.0.display());
        }
        if let Some(mount) = self.0.parent() {
            let _ = Command::new("umount").arg("-l").arg(mount).output();
            let _ = std::fs::remove_dir(mount);
        }
    }
}

/// A file removed at the end.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
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
    assert_eq!(
        (d[0].block_id, d[0].port, d[0].addr, d[0].action, d[0].sendmsg),
        (7, bp, LO, DenialAction::Denied, false)
    );
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

#[test]
fn two_cgroup_scoped_rules_share_one_prefix() {
    let cg = TestCgroup::new("tenants");
    let (a, b, c) = (cg.child("a"), cg.child("b"), cg.child("c"));
    let pins = TestPins::new("tenants");
    let (_l, port) = listener();
    let (mut guard, _) = open(&cg, &pins, FailMode::Closed);
    guard
        .set_rules(&[
            deny(1, "127.0.0.1/32", Some(port), RuleScope::Cgroup(a.0.clone())),
            deny(2, "127.0.0.1/32", Some(port), RuleScope::Cgroup(b.0.clone())),
        ])
        .unwrap();
    let installed = guard.installed().unwrap();
    assert_eq!((installed.entries4, installed.entries6), (1, 1), "one key per family holds both");
    assert_eq!(connect_from(&a.0, &[port]), [EPERM]);
    assert_eq!(connect_from(&b.0, &[port]), [EPERM]);
    assert_eq!(connect_from(&c.0, &[port]), [0]);
    let ids: Vec<u32> = guard.denials().iter().map(|d| d.block_id).collect();
    assert_eq!(ids, [1, 2]);

    // Lifting one tenant's block leaves the other's.
    guard.set_rules(&[deny(2, "127.0.0.1/32", Some(port), RuleScope::Cgroup(b.0.clone()))]).unwrap();
    assert_eq!(connect_from(&a.0, &[port]), [0]);
    assert_eq!(connect_from(&b.0, &[port]), [EPERM]);
}

#[test]
fn more_than_four_rules_on_a_key_are_refused_and_nothing_changes() {
    let cg = TestCgroup::new("collide");
    let pins = TestPins::new("collide");
    let (_l, port) = listener();
    let (mut guard, _) = open(&cg, &pins, FailMode::Closed);
    guard.set_rules(&[deny(1, "127.0.0.1/32", Some(port), RuleScope::Any)]).unwrap();
    let before = guard.installed().unwrap();

    let five: Vec<_> =
        (2..=6).map(|id| deny(id, "127.0.0.1/32", Some(port), RuleScope::Cgroup(cg.0.clone()))).collect();
    let err = guard.set_rules(&five).unwrap_err().to_string();
    assert!(err.contains(&format!("127.0.0.1/32 port {port}: blocks [2, 3, 4, 5, 6]")), "{err}");
    assert_eq!(guard.installed().unwrap(), before);
    assert_eq!(connect_from(&cg.0, &[port]), [EPERM]);
    assert_eq!(guard.denials()[0].block_id, 1);

    // Four fit.
    guard.set_rules(&five[..4]).unwrap();
    assert_eq!(guard.installed().unwrap().block_ids, BTreeSet::from([2, 3, 4, 5]));
}

#[test]
fn exe_scope_tells_a_copy_of_python_apart() {
    let cg = TestCgroup::new("exe");
    let pins = TestPins::new("exe");
    let copy = TempFile(std::env::temp_dir().join(format!("aegis-test-python-{}", std::process::id())));
    std::fs::copy(python(), &copy.0).unwrap();
    let (_l, port) = listener();
    let (mut guard, _) = open(&cg, &pins, FailMode::Closed);

    guard.set_rules(&[deny(1, "127.0.0.1/32", Some(port), RuleScope::Exe(python().to_owned()))]).unwrap();
    assert_eq!(connect_with(&cg.0, python(), &[port]), [EPERM]);
    assert_eq!(connect_with(&cg.0, &copy.0, &[port]), [0]);

    guard.set_rules(&[deny(1, "127.0.0.1/32", Some(port), RuleScope::Exe(copy.0.clone()))]).unwrap();
    assert_eq!(connect_with(&cg.0, python(), &[port]), [0]);
    assert_eq!(connect_with(&cg.0, &copy.0, &[port]), [EPERM]);
}

/// Accept `n` connections on `l` within a deadline, greeting each with `banner`.
fn serve(l: TcpListener, n: usize, banner: &'static [u8]) -> thread::JoinHandle<usize> {
    l.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut served = 0;
        while served < n && Instant::now() < deadline {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(banner);
                    served += 1;
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
        served
    })
}

#[test]
fn redirect_sends_tcp_to_the_fallback_and_refuses_udp() {
    let cg = TestCgroup::new("redirect");
    let pins = TestPins::new("redirect");
    let (blocked, bp) = listener();
    blocked.set_nonblocking(true).unwrap();
    let (fallback, fp) = listener();
    let server = serve(fallback, 2, b"fallback");
    let (mut guard, _) = open(&cg, &pins, FailMode::Closed);
    let to = SocketAddr::new(LO, fp);
    guard
        .set_rules(&[DestRule {
            id: 5,
            net: net("127.0.0.1/32"),
            port: Some(bp),
            scope: RuleScope::Any,
            action: RuleAction::Redirect(to),
            expires: None,
        }])
        .unwrap();
    let script = format!(
        "import socket
s = socket.socket(); s.settimeout(2); s.connect(('127.0.0.1', {bp}))
print(s.getpeername()[1]); print(s.recv(16).decode())
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b'x', ('127.0.0.1', {bp})); print('sent')
except OSError as e:
    print(e.errno)
d = socket.socket(socket.AF_INET6); d.settimeout(2); d.connect(('::ffff:127.0.0.1', {bp}))
print(d.getpeername()[0], d.getpeername()[1]); print(d.recv(16).decode())
"
    );
    let out = run_in(&cg.0, python(), &script);
    assert_eq!(
        out,
        [fp.to_string(), "fallback".into(), EPERM.to_string(), format!("::ffff:127.0.0.1 {fp}"), "fallback".into()]
    );
    assert_eq!(server.join().unwrap(), 2);
    assert!(blocked.accept().is_err(), "nothing reached the blocked listener");

    let c = guard.counters().unwrap();
    assert_eq!((c.redirected, c.denied), (2, 1), "{c:?}");
    let d: Vec<_> = guard.denials().into_iter().map(|d| (d.block_id, d.action, d.sendmsg, d.addr, d.port)).collect();
    assert_eq!(
        d,
        [
            (5, DenialAction::Redirected, false, LO, bp),
            (5, DenialAction::Denied, true, LO, bp),
            (5, DenialAction::Redirected, false, LO, bp),
        ]
    );
}

#[test]
fn rule_expires_in_the_kernel_without_the_agent() {
    let cg = TestCgroup::new("expiry");
    let pins = TestPins::new("expiry");
    let (_l, port) = listener();
    let (mut guard, _) = open(&cg, &pins, FailMode::Closed);
    let expires = SystemTime::now() + Duration::from_secs(1);
    let mut rule = deny(3, "127.0.0.1/32", Some(port), RuleScope::Any);
    rule.expires = Some(expires);
    guard.set_rules(&[rule.clone()]).unwrap();
    // An already expired rule is not installed.
    let mut old = deny(4, "127.0.0.1/32", None, RuleScope::Any);
    old.expires = Some(SystemTime::now() - Duration::from_secs(1));
    let report = guard.set_rules(&[rule, old]).unwrap();
    assert_eq!((report.rules, report.expired.as_slice()), (1, &[4][..]));
    assert_eq!(connect_from(&cg.0, &[port]), [EPERM]);
    guard.release();

    // No agent from here on.
    thread::sleep(expires.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(50));
    assert_eq!(connect_from(&cg.0, &[port]), [0]);

    let (guard, adopted) = open(&cg, &pins, FailMode::Closed);
    assert!(adopted.adopted && adopted.rules == 1, "{adopted:?}");
    let c = guard.counters().unwrap();
    assert_eq!((c.denied, c.expired_rule_skipped), (1, 1), "{c:?}");
}

#[test]
fn fail_open_lifts_blocks_after_the_grace_and_fail_closed_keeps_them() {
    let cg = TestCgroup::new("failmode");
    let pins = TestPins::new("failmode");
    let (_l, port) = listener();
    let (mut guard, _) = open(&cg, &pins, FailMode::Closed);
    guard.set_rules(&[deny(1, "127.0.0.1/32", Some(port), RuleScope::Any)]).unwrap();
    // Long enough that a loaded machine (load average 10 on 2 cores was seen to take more
    // than 300 ms between a beat and the next connect) does not age a fresh heartbeat.
    let grace = Duration::from_millis(1500);

    // Closed: a stale heartbeat changes nothing.
    thread::sleep(grace + Duration::from_millis(100));
    assert_eq!(connect_from(&cg.0, &[port]), [EPERM]);

    guard.set_fail_mode(FailMode::Open { grace }).unwrap();
    assert_eq!(connect_from(&cg.0, &[port]), [EPERM], "a fresh heartbeat keeps enforcing");
    thread::sleep(grace + Duration::from_millis(100));
    assert_eq!(connect_from(&cg.0, &[port]), [0], "past the grace without a heartbeat");
    assert_eq!(guard.counters().unwrap().allowed_fail_open, 1);

    guard.heartbeat_handle().unwrap().beat().unwrap();
    assert_eq!(connect_from(&cg.0, &[port]), [EPERM], "beating again enforces again");
    let c = guard.counters().unwrap();
    assert_eq!((c.denied, c.allowed_fail_open), (3, 1), "{c:?}");
}

#[test]
fn pinned_state_outlives_the_agent_and_is_reconciled_on_adoption() {
    let cg = TestCgroup::new("pins");
    let pins = TestPins::new("pins");
    let (_l1, p1) = listener();
    let (_l2, p2) = listener();
    let (mut guard, _) = open(&cg, &pins, FailMode::Closed);
    guard
        .set_rules(&[
            deny(1, "127.0.0.1/32", Some(p1), RuleScope::Any),
            deny(2, "127.0.0.1/32", Some(p2), RuleScope::Any),
        ])
        .unwrap();
    guard.release();
    assert_eq!(connect_from(&cg.0, &[p1, p2]), [EPERM, EPERM], "still enforced with no agent");

    let (mut guard, adopted) = open(&cg, &pins, FailMode::Closed);
    assert_eq!(adopted, Adopted { adopted: true, rules: 2, programs_updated: false, replaced: false });
    // Events made while no agent read them are still there.
    assert_eq!(guard.denials().len(), 2);
    let report = guard.set_rules(&[deny(1, "127.0.0.1/32", Some(p1), RuleScope::Any)]).unwrap();
    assert_eq!((report.unchanged, report.removed, report.added), (2, 2, 0), "{report:?}");
    assert_eq!(connect_from(&cg.0, &[p1, p2]), [EPERM, 0]);

    guard.remove().unwrap();
    assert!(!pins.0.exists());
    assert_eq!(connect_from(&cg.0, &[p1, p2]), [0, 0], "detached");
}

fn set_meta(pins: &TestPins, slot: u32, value: u64) {
    let data = MapData::from_pin(pins.0.join("META")).unwrap();
    let mut meta: Array<MapData, u64> = Array::try_from(Map::from_map_data(data).unwrap()).unwrap();
    meta.set(slot, &value, 0).unwrap();
}

#[test]
fn another_build_is_updated_in_place_and_another_layout_is_replaced_without_a_gap() {
    let cg = TestCgroup::new("upgrade");
    let pins = TestPins::new("upgrade");
    let (_l, port) = listener();
    let (mut guard, _) = open(&cg, &pins, FailMode::Closed);
    guard.set_rules(&[deny(1, "127.0.0.1/32", Some(port), RuleScope::Any)]).unwrap();
    guard.release();

    // Same layout, another object: the links get this build's programs, rules stay.
    set_meta(&pins, META_SLOT_OBJECT, 1);
    let (guard, adopted) = open(&cg, &pins, FailMode::Closed);
    assert_eq!(adopted, Adopted { adopted: true, rules: 1, programs_updated: true, replaced: false });
    assert_eq!(connect_from(&cg.0, &[port]), [EPERM]);
    guard.release();

    // Another layout: replaced; the old set enforces until the new one has its rules.
    set_meta(&pins, META_SLOT_LAYOUT, LAYOUT_VERSION + 1);
    let (mut guard, adopted) = open(&cg, &pins, FailMode::Closed);
    assert_eq!(adopted, Adopted { adopted: false, rules: 0, programs_updated: false, replaced: true });
    let retired = sibling(&pins.0, "retired");
    assert!(retired.exists());
    assert_eq!(connect_from(&cg.0, &[port]), [EPERM], "the old set still enforces");
    guard.set_rules(&[]).unwrap();
    assert!(!retired.exists());
    assert_eq!(connect_from(&cg.0, &[port]), [0]);
    guard.release();

    // A pinned link that no longer holds the cgroup is not adopted.
    bpf_link_detach(&bpf_obj_get(&pins.0.join("link_connect4")).unwrap()).unwrap();
    let (_guard, adopted) = open(&cg, &pins, FailMode::Closed);
    assert!(adopted.replaced && !adopted.adopted, "{adopted:?}");
}

#[test]
fn ipv6_rules_and_dual_stack_sockets() {
    let cg = TestCgroup::new("ipv6");
    let pins = TestPins::new("ipv6");
    let l6 = TcpListener::bind("[::1]:0").unwrap();
    let p6 = l6.local_addr().unwrap().port();
    let (_l4, p4) = listener();
    let (mut guard, _) = open(&cg, &pins, FailMode::Closed);
    guard
        .set_rules(&[deny(1, "::1/128", Some(p6), RuleScope::Any), deny(2, "127.0.0.0/8", Some(p4), RuleScope::Any)])
        .unwrap();
    let script = format!(
        "import socket
for host, p in [('::1', {p6}), ('::ffff:127.0.0.1', {p4}), ('::1', {p4})]:
    s = socket.socket(socket.AF_INET6); print(s.connect_ex((host, p))); s.close()
"
    );
    let out = run_in(&cg.0, python(), &script);
    assert_eq!(out, [EPERM.to_string(), EPERM.to_string(), libc::ECONNREFUSED.to_string()]);
    let d: Vec<_> = guard.denials().into_iter().map(|d| (d.block_id, d.addr)).collect();
    assert_eq!(d, [(1, "::1".parse().unwrap()), (2, LO)]);
}
