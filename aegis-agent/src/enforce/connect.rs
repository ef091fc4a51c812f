//! Loading the destination-block programs (`aegis-ebpf/src/connect.rs`) onto a cgroup and
//! keeping their maps in step with the agent's blocks.
//!
//! The programs run for every process in the cgroup they are attached to (the whole host
//! when it is the cgroup v2 root); a block can narrow that to a subtree. Dropping
//! [`ConnectGuard`] detaches them.

use std::{
    fs::File,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use aegis_common::enforce::{ConnectDenied, DestBlock, Ip4, Ip6};
use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{MapData, RingBuf, lpm_trie::{Key, LpmTrie}},
    programs::{CgroupSockAddr, links::CgroupAttachMode},
};

use super::sockdiag::IpNet;
use crate::capture::process::cgroup2_root;

static ENFORCE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/aegis-enforce"));

const PROGRAMS: [&str; 4] = ["block_connect4", "block_sendmsg4", "block_connect6", "block_sendmsg6"];

/// A refused connect or sendmsg.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub block_id: u32,
    pub pid: u32,
    pub tid: u32,
    pub cgroup_id: u64,
    pub addr: IpAddr,
    pub port: u16,
    pub sendmsg: bool,
    pub comm: String,
}

pub struct ConnectGuard {
    _ebpf: Ebpf,
    blocks4: LpmTrie<MapData, Ip4, DestBlock>,
    blocks6: LpmTrie<MapData, Ip6, DestBlock>,
    denials: RingBuf<MapData>,
}

impl ConnectGuard {
    /// Load the programs and attach them to the cgroup v2 directory `cgroup`.
    pub fn attach(cgroup: &Path) -> anyhow::Result<Self> {
        let mut ebpf = Ebpf::load(ENFORCE_OBJECT).context("loading the enforcement programs failed")?;
        let dir = File::open(cgroup).with_context(|| format!("cannot open cgroup {}", cgroup.display()))?;
        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            prog.load().with_context(|| format!("the kernel rejected {name}"))?;
            prog.attach(&dir, CgroupAttachMode::default())
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        }
        let blocks4 = LpmTrie::try_from(ebpf.take_map("BLOCKS4").context("map BLOCKS4 missing")?)?;
        let blocks6 = LpmTrie::try_from(ebpf.take_map("BLOCKS6").context("map BLOCKS6 missing")?)?;
        let denials = RingBuf::try_from(ebpf.take_map("DENIALS").context("map DENIALS missing")?)?;
        Ok(Self { _ebpf: ebpf, blocks4, blocks6, denials })
    }

    /// Refuse connects and sends to `net` (and `port`, when given) from processes in
    /// `scope` (a cgroup v2 directory; None: every process under the attach point).
    /// A second block on the same prefix replaces the first.
    pub fn block(&mut self, id: u32, net: IpNet, port: Option<u16>, scope: Option<&Path>) -> anyhow::Result<()> {
        let (cgroup_id, cgroup_level) = match scope {
            Some(p) => cgroup_identity(p)?,
            None => (0, 0),
        };
        let value = DestBlock { id, port: port.unwrap_or(0), cgroup_id, cgroup_level, ..Default::default() };
        match net.addr.to_canonical() {
            IpAddr::V4(a) => {
                let prefix = u32::from(net.prefix.min(32));
                self.blocks4.insert(&Key::new(prefix, a.octets()), &value, 0)?;
                // Dual-stack sockets reach IPv4 hosts through ::ffff:a.b.c.d.
                let mapped = a.to_ipv6_mapped().octets();
                self.blocks6.insert(&Key::new(96 + prefix, mapped), &value, 0)?;
            }
            IpAddr::V6(a) => self.blocks6.insert(&Key::new(u32::from(net.prefix.min(128)), a.octets()), &value, 0)?,
        }
        Ok(())
    }

    /// Lift the block on exactly `net`.
    pub fn unblock(&mut self, net: IpNet) -> anyhow::Result<()> {
        match net.addr.to_canonical() {
            IpAddr::V4(a) => {
                let prefix = u32::from(net.prefix.min(32));
                self.blocks4.remove(&Key::new(prefix, a.octets()))?;
                self.blocks6.remove(&Key::new(96 + prefix, a.to_ipv6_mapped().octets()))?;
            }
            IpAddr::V6(a) => self.blocks6.remove(&Key::new(u32::from(net.prefix.min(128)), a.octets()))?,
        }
        Ok(())
    }

    /// Denials reported since the last call.
    pub fn denials(&mut self) -> Vec<Denial> {
        let mut out = Vec::new();
        while let Some(item) = self.denials.next() {
            if item.len() < std::mem::size_of::<ConnectDenied>() {
                continue;
            }
            // SAFETY: the record holds a ConnectDenied written by our program.
            let d: ConnectDenied = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let addr = if d.family == 4 {
                IpAddr::from([d.addr[0], d.addr[1], d.addr[2], d.addr[3]])
            } else {
                IpAddr::from(d.addr).to_canonical()
            };
            let end = d.comm.iter().position(|&b| b == 0).unwrap_or(16);
            out.push(Denial {
                block_id: d.block_id,
                pid: (d.pid_tgid >> 32) as u32,
                tid: d.pid_tgid as u32,
                cgroup_id: d.cgroup_id,
                addr,
                port: d.port,
                sendmsg: d.sendmsg != 0,
                comm: String::from_utf8_lossy(&d.comm[..end]).into_owned(),
            });
        }
        out
    }
}

/// The id (directory inode) and depth of a cgroup v2 directory.
pub(crate) fn cgroup_identity(dir: &Path) -> anyhow::Result<(u64, u32)> {
    let id = std::fs::metadata(dir).with_context(|| format!("cannot read cgroup {}", dir.display()))?.ino();
    let root = cgroup2_root().context("no cgroup v2 mount found")?;
    let rel = dir
        .strip_prefix(&root)
        .with_context(|| format!("{} is not under the cgroup v2 mount {}", dir.display(), root.display()))?;
    Ok((id, rel.components().count() as u32))
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, TcpListener, TcpStream},
        os::unix::process::CommandExt as _,
        path::PathBuf,
        process::Command,
    };

    use super::*;

    /// A child cgroup made for the test and removed at the end, also on failure.
    struct TestCgroup(PathBuf);

    impl TestCgroup {
        fn new(name: &str) -> Self {
            let root = cgroup2_root().expect("cgroup v2 is mounted");
            let dir = root.join(format!("aegis-test-{name}-{}", std::process::id()));
            std::fs::create_dir(&dir).expect("creating a test cgroup (needs root)");
            Self(dir)
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    /// Run a python connect to each port from inside `cgroup`; the errno of each (0: ok).
    fn connect_from(cgroup: &Path, ports: &[u16]) -> Vec<i32> {
        let procs = cgroup.join("cgroup.procs");
        let script = format!(
            "import socket\nfor p in {ports:?}:\n    s = socket.socket()\n    print(s.connect_ex(('127.0.0.1', p)))\n    s.close()\n"
        );
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(script);
        // SAFETY: only a write(2) to a path prepared before fork.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, b"0"));
        }
        let out = cmd.output().expect("running python3");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().parse().unwrap()).collect()
    }

    #[test]
    fn blocked_destination_is_refused_only_inside_the_cgroup_and_only_on_its_port() {
        let cg = TestCgroup::new("connect");
        let blocked = TcpListener::bind("127.0.0.1:0").unwrap();
        let open = TcpListener::bind("127.0.0.1:0").unwrap();
        let (bp, op) = (blocked.local_addr().unwrap().port(), open.local_addr().unwrap().port());
        {
            let mut guard = ConnectGuard::attach(&cg.0).expect("attaching to the test cgroup");
            guard.block(7, IpNet::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 32).unwrap(), Some(bp), None).unwrap();
            assert_eq!(connect_from(&cg.0, &[bp, op]), [libc::EPERM, 0]);
            // This test process is outside the cgroup: unaffected.
            TcpStream::connect(("127.0.0.1", bp)).expect("outside the scope a connect still works");
            let denials = guard.denials();
            assert_eq!(denials.len(), 1, "{denials:?}");
            assert_eq!((denials[0].block_id, denials[0].port, denials[0].addr), (7, bp, IpAddr::V4(Ipv4Addr::LOCALHOST)));
            assert!(denials[0].comm.starts_with("python"), "{denials:?}");

            // A subtree scope that the process is not in: allowed.
            let other = TestCgroup::new("other");
            guard.block(8, IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).unwrap(), None, Some(&other.0)).unwrap();
            guard.unblock(IpNet::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 32).unwrap()).unwrap();
            assert_eq!(connect_from(&cg.0, &[bp, op]), [0, 0]);
            // The scope is the test cgroup itself: every port refused.
            guard.block(9, IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).unwrap(), None, Some(&cg.0)).unwrap();
            assert_eq!(connect_from(&cg.0, &[bp, op]), [libc::EPERM, libc::EPERM]);
        }
        // Guard dropped: detached.
        assert_eq!(connect_from(&cg.0, &[bp]), [0]);
    }
}
