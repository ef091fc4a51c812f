//! The connect watch in the kernel (`aegis-ebpf/src/watch.rs`): loaded from its own object,
//! configured with the socket offsets of this kernel's BTF and the watched ports, attached
//! to the `inet_sock_set_state` raw tracepoint; its events and counters read back.

use std::net::{IpAddr, SocketAddr};

use aegis_common::watch::{
    CFG_ALL_PORTS, CFG_OFF_DADDR, CFG_OFF_DPORT, CFG_OFF_FAMILY, CFG_OFF_V6_DADDR, CFG_READY, CNT_CONNECTS, CNT_LOST,
    CNT_SENT, CNT_UNREADABLE, ConnectSeen, PORTS_MAX,
};
use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::RawTracePoint,
};

use super::Connect;
use crate::kernel::{
    btf::Btf,
    objects::{self, WATCH},
};

const PROGRAM: &str = "watch_connect";
const TRACEPOINT: &str = "inet_sock_set_state";

/// The kernel's counts (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounts {
    pub connects: u64,
    pub sent: u64,
    pub lost: u64,
    pub unreadable: u64,
}

/// The loaded, attached watch. Dropping it detaches the program.
pub struct ConnectWatch {
    ebpf: Ebpf,
    config: Array<MapData, u64>,
    ports: HashMap<MapData, u16, u8>,
    counters: PerCpuArray<MapData, u64>,
    events: RingBuf<MapData>,
    watched: Option<Vec<u16>>,
}

impl ConnectWatch {
    /// Load, configure for `ports` (None: every port) and attach.
    pub fn start(btf: &Btf, ports: Option<&[u16]>) -> anyhow::Result<Self> {
        let common = btf.member_offset("sock", "__sk_common")?;
        let offset = |member: &str| -> anyhow::Result<u64> {
            let off = common + btf.member_offset("sock_common", member)?;
            anyhow::ensure!(off < 0x1000, "sock_common.{member} at offset {off}, past what the program reads");
            Ok(off)
        };
        let offsets = [
            (CFG_OFF_FAMILY, offset("skc_family")?),
            (CFG_OFF_DPORT, offset("skc_dport")?),
            (CFG_OFF_DADDR, offset("skc_daddr")?),
            (CFG_OFF_V6_DADDR, offset("skc_v6_daddr")?),
        ];
        let mut ebpf = EbpfLoader::new().load(WATCH.bytes).context("cannot create the connect watch's maps")?;
        let mut take = |name: &str| ebpf.take_map(name).with_context(|| format!("map {name} missing"));
        let mut config: Array<MapData, u64> = Array::try_from(take("WATCH_CONFIG")?)?;
        let ports_map: HashMap<MapData, u16, u8> = HashMap::try_from(take("WATCH_PORTS")?)?;
        let counters = PerCpuArray::try_from(take("WATCH_COUNTERS")?)?;
        let events = RingBuf::try_from(take("WATCH_EVENTS")?)?;
        for (slot, off) in offsets {
            config.set(slot, &off, 0)?;
        }
        let mut watch = Self { ebpf, config, ports: ports_map, counters, events, watched: Some(Vec::new()) };
        watch.set_ports(ports)?;
        watch.config.set(CFG_READY, &1, 0)?;
        objects::load_program(&mut watch.ebpf, PROGRAM)?;
        let program: &mut RawTracePoint =
            watch.ebpf.program_mut(PROGRAM).context("program missing")?.try_into().context("program type")?;
        program.attach(TRACEPOINT).with_context(|| format!("cannot attach to the raw tracepoint {TRACEPOINT}"))?;
        Ok(watch)
    }

    /// Watch connects to `ports` (None: every port), replacing the ports watched before.
    pub fn set_ports(&mut self, ports: Option<&[u16]>) -> anyhow::Result<()> {
        let wanted = match ports {
            Some(p) if p.len() > PORTS_MAX as usize => None,
            Some(p) => Some(p.to_vec()),
            None => None,
        };
        if wanted == self.watched {
            return Ok(());
        }
        self.config.set(CFG_ALL_PORTS, &u64::from(wanted.is_none()), 0)?;
        let old: Vec<u16> = self.ports.keys().filter_map(Result::ok).collect();
        let keep = wanted.clone().unwrap_or_default();
        for port in old.iter().filter(|p| !keep.contains(p)) {
            let _ = self.ports.remove(port);
        }
        for port in &keep {
            self.ports.insert(port, &1, 0)?;
        }
        self.watched = wanted;
        Ok(())
    }

    /// Connects reported since the last call.
    pub fn events(&mut self) -> Vec<Connect> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() < std::mem::size_of::<ConnectSeen>() {
                continue;
            }
            // SAFETY: the record holds a ConnectSeen written by our program.
            let e: ConnectSeen = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let ip = if e.family == 4 {
                IpAddr::from([e.addr[0], e.addr[1], e.addr[2], e.addr[3]])
            } else {
                IpAddr::from(e.addr).to_canonical()
            };
            let end = e.comm.iter().position(|&b| b == 0).unwrap_or(16);
            out.push(Connect {
                timestamp_ns: e.timestamp_ns,
                tgid: (e.pid_tgid >> 32) as u32,
                tid: e.pid_tgid as u32,
                cgroup_id: e.cgroup_id,
                dest: SocketAddr::new(ip, e.port),
                comm: String::from_utf8_lossy(&e.comm[..end]).into_owned(),
                udp: false,
                sni: None,
            });
        }
        out
    }

    pub fn counts(&self) -> KernelCounts {
        let sum = |slot: u32| {
            self.counters.get(&slot, 0).map(|v| v.iter().fold(0u64, |a, x| a.wrapping_add(*x))).unwrap_or(0)
        };
        KernelCounts {
            connects: sum(CNT_CONNECTS),
            sent: sum(CNT_SENT),
            lost: sum(CNT_LOST),
            unreadable: sum(CNT_UNREADABLE),
        }
    }

    /// Wait until the kernel reports a connect, `also` has something to read, or `timeout`
    /// passes (poll on the ring): a process is looked at within moments of its connect,
    /// before a short-lived one exits.
    pub fn wait(&self, timeout: std::time::Duration, also: Option<std::os::fd::BorrowedFd<'_>>) {
        use std::os::fd::AsRawFd as _;
        let mut pfds = [
            libc::pollfd { fd: self.events.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: also.map_or(-1, |f| f.as_raw_fd()), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfds for the duration of the call (a negative fd is ignored).
        unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout.as_millis() as i32) };
    }

    /// Instructions the verifier processed for the program.
    pub fn verified_insns(&self) -> Option<u32> {
        objects::verified_insns(&self.ebpf, PROGRAM)
    }
}
