//! Blind spots: processes that talk to a model endpoint while capture sees none of their
//! plaintext, reported with the process, the destination and the likely reason.
//!
//! Two streams meet here, both stamped by the kernel's monotonic clock:
//! - connects: every TCP connect on the host to a port a provider listens on, from the
//!   connect watch ([`watch`], a raw tracepoint), kept when the destination is a known model
//!   endpoint ([`Endpoints`]: the providers' configured addresses and what their names
//!   resolve to); every connected UDP socket to such an endpoint ([`udp`]: QUIC, which
//!   capture never reads, so plaintext never explains it); and every TLS ClientHello whose
//!   server name belongs to a provider, sent to an address not known as its endpoint
//!   ([`sni`]);
//! - plaintext: every connection capture starts following (a new `(tgid, SSL *)`), from
//!   capture's connection tables ([`Tracker::plaintext_seen`]).
//!
//! A connect is *explained* by a connection of the same process whose plaintext capture
//! starts after the connect and within `grace` of it: one connection explains one connect.
//! A connect still unexplained after `grace` is a blind spot. Its process is examined when
//! its first unexplained connect arrives (while it still runs: [`diagnose`]) and the report
//! names the likely reason. Reports are grouped by process and destination and repeated at
//! most once per `repeat` for the same pair (the connects in between are counted in the
//! next one, and in [`Stats`]).
//!
//! Bounded: at most [`MAX_PROCESSES`] processes with unexplained connects and
//! [`MAX_PENDING`] connects per process are held; past that, connects are counted as
//! `overflow` and not followed (said in `status`).

pub mod diagnose;
pub mod service;
pub mod sni;
pub mod sockets;
pub mod udp;
pub mod watch;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    path::PathBuf,
};

use serde::Serialize;

use crate::net::IpNet;

/// Processes with unexplained connects held at once.
pub const MAX_PROCESSES: usize = 4096;
/// Unexplained connects held per process.
pub const MAX_PENDING: usize = 256;
/// New plaintext connections remembered per process, waiting for their connect event.
const MAX_RECENT: usize = 64;

/// A known model endpoint: a provider's networks and ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub provider: String,
    pub nets: Vec<IpNet>,
    /// Empty: every port.
    pub ports: Vec<u16>,
}

/// Every known model endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints(pub Vec<Endpoint>);

impl Endpoints {
    /// The provider `dest` belongs to, if any.
    pub fn provider_of(&self, dest: SocketAddr) -> Option<&str> {
        let ip = dest.ip().to_canonical();
        self.0
            .iter()
            .find(|e| (e.ports.is_empty() || e.ports.contains(&dest.port())) && e.nets.iter().any(|n| n.contains(ip)))
            .map(|e| e.provider.as_str())
    }

    /// The ports the connect watch must see; None: every port.
    pub fn ports(&self) -> Option<Vec<u16>> {
        let mut ports = Vec::new();
        for e in self.0.iter().filter(|e| !e.nets.is_empty()) {
            if e.ports.is_empty() {
                return None;
            }
            ports.extend(&e.ports);
        }
        ports.sort_unstable();
        ports.dedup();
        Some(ports)
    }
}

/// A connect seen by the connect watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub timestamp_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub cgroup_id: u64,
    pub dest: SocketAddr,
    pub comm: String,
    /// A UDP flow (QUIC), found by [`udp`], not a TCP connect.
    pub udp: bool,
    /// Found by the server name of its ClientHello ([`sni`]), which names its provider.
    pub sni: Option<SniName>,
}

/// A ClientHello's server name and the provider it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SniName {
    pub host: String,
    pub provider: String,
}

/// What the examination of a process found ([`diagnose`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Diagnosis {
    /// The TLS stack the process most likely uses: `rustls`, `nss`, `go`, `openssl`,
    /// `gnutls`, `static` or `unknown`; `quic` for a UDP flow.
    pub stack: &'static str,
    /// Why capture likely sees nothing of it, and what to do.
    pub reason: String,
    pub exe: Option<PathBuf>,
}

/// The `blind_spot` record.
#[derive(Clone, Debug, Serialize)]
pub struct BlindSpot {
    pub time: String,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub exe: Option<PathBuf>,
    /// The destination, ADDR:PORT, and the provider it belongs to.
    pub dest: String,
    pub provider: String,
    /// Connects to `dest` by this process with no plaintext seen, since the last report of
    /// the pair.
    pub connects: u64,
    /// `stack` and `reason` of [`Diagnosis`].
    pub stack: &'static str,
    pub reason: String,
    /// How long capture was given to see the connection's plaintext.
    pub grace_ms: u64,
    /// The server name of the connection's ClientHello, when that is what named the
    /// destination a model endpoint (its address is not one the agent knows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
}

/// Counts for `status` and the periodic stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Connects to a known model endpoint.
    pub connects: u64,
    /// Of those, explained by captured plaintext.
    pub explained: u64,
    /// Of those, unexplained after the grace: blind.
    pub blind: u64,
    /// `blind_spot` records written.
    pub reports: u64,
    /// Connects not followed because the tables were full.
    pub overflow: u64,
    /// Connects to a watched port whose destination is no known endpoint.
    pub other: u64,
}

/// A blind connect taken out of the tracker, to be diagnosed and reported.
pub struct Due {
    pub tgid: u32,
    connect: Connect,
    provider: String,
    /// The process's snapshot, the first time one of its connects is due.
    pub snapshot: Option<diagnose::Snapshot>,
    /// Set from `snapshot` by the caller.
    pub diagnosis: Option<Diagnosis>,
}

struct Pending {
    connect: Connect,
    provider: String,
}

struct Process {
    pending: VecDeque<Pending>,
    snapshot: diagnose::Snapshot,
    /// Made from the snapshot once a connect stays unexplained.
    diagnosis: Option<Diagnosis>,
}

/// What a UDP flow to a model endpoint is said to be, whatever the process's TLS stack.
fn quic(process: Diagnosis) -> Diagnosis {
    Diagnosis {
        stack: "quic",
        reason: "a UDP flow to a model endpoint: QUIC (HTTP/3), whose TLS runs inside the QUIC library (quiche, \
                 ngtcp2, msquic, aioquic, quic-go) where capture does not hook; turn HTTP/3 off in the client, or \
                 block UDP to the endpoint so that it falls back to TCP"
            .into(),
        exe: process.exe,
    }
}

/// The matching of connects and plaintext.
pub struct Tracker {
    endpoints: Endpoints,
    grace_ns: u64,
    repeat_ns: u64,
    procs: HashMap<u32, Process>,
    /// New plaintext connections per process (their first event's time), kept for `grace`
    /// in case their connect event comes after them (the two rings are read apart).
    recent: HashMap<u32, VecDeque<u64>>,
    /// Last report per (process, destination), and connects since it.
    reported: HashMap<(u32, SocketAddr), (u64, u64)>,
    /// Diagnoses of processes reported, by process.
    diagnosed: HashMap<u32, Diagnosis>,
    stats: Stats,
}

impl Tracker {
    pub fn new(endpoints: Endpoints, grace_ns: u64, repeat_ns: u64) -> Self {
        Self {
            endpoints,
            grace_ns: grace_ns.max(1),
            repeat_ns,
            procs: HashMap::new(),
            recent: HashMap::new(),
            reported: HashMap::new(),
            diagnosed: HashMap::new(),
            stats: Stats::default(),
        }
    }

    pub fn set_endpoints(&mut self, endpoints: Endpoints) {
        self.endpoints = endpoints;
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether `connect` goes to a model endpoint (what [`Tracker::on_connect`] follows).
    pub fn is_model_endpoint(&self, connect: &Connect) -> bool {
        self.provider_of(connect).is_some()
    }

    /// The provider `connect` goes to: the one its server name names, else the one its
    /// destination belongs to.
    fn provider_of<'a>(&'a self, connect: &'a Connect) -> Option<&'a str> {
        match &connect.sni {
            Some(s) => Some(&s.provider),
            None => self.endpoints.provider_of(connect.dest),
        }
    }

    /// A connect from the watch; `snapshot` is called for a process's first unexplained
    /// connect (it looks at /proc while the process still runs). Returns whether the
    /// destination is a known model endpoint.
    pub fn on_connect(&mut self, connect: Connect, snapshot: impl FnOnce(u32) -> diagnose::Snapshot) -> bool {
        let Some(provider) = self.provider_of(&connect).map(str::to_owned) else {
            self.stats.other += 1;
            return false;
        };
        self.stats.connects += 1;
        if !connect.udp
            && let Some(recent) = self.recent.get_mut(&connect.tgid)
            && let Some(i) =
                recent.iter().position(|&t| t >= connect.timestamp_ns && t - connect.timestamp_ns <= self.grace_ns)
        {
            recent.remove(i);
            self.stats.explained += 1;
            return true;
        }
        if !self.procs.contains_key(&connect.tgid) && self.procs.len() >= MAX_PROCESSES {
            self.stats.overflow += 1;
            return true;
        }
        let proc = self.procs.entry(connect.tgid).or_insert_with(|| Process {
            pending: VecDeque::new(),
            snapshot: snapshot(connect.tgid),
            diagnosis: None,
        });
        if proc.pending.len() >= MAX_PENDING {
            self.stats.overflow += 1;
            return true;
        }
        proc.pending.push_back(Pending { connect, provider });
        true
    }

    /// Capture started following a connection of `tgid` at `timestamp_ns` (its first event).
    /// It explains a TCP connect, never a UDP flow.
    pub fn plaintext_seen(&mut self, tgid: u32, timestamp_ns: u64) {
        if let Some(proc) = self.procs.get_mut(&tgid)
            && let Some(i) = proc.pending.iter().position(|p| {
                !p.connect.udp
                    && p.connect.timestamp_ns <= timestamp_ns
                    && timestamp_ns - p.connect.timestamp_ns <= self.grace_ns
            })
        {
            proc.pending.remove(i);
            self.stats.explained += 1;
            if proc.pending.is_empty() {
                self.procs.remove(&tgid);
            }
            return;
        }
        let recent = self.recent.entry(tgid).or_default();
        if recent.len() >= MAX_RECENT {
            recent.pop_front();
        }
        recent.push_back(timestamp_ns);
    }

    /// Connects unexplained for longer than the grace at `now_ns`, taken out; forgets what
    /// is too old to explain anything. Each comes with its process's snapshot the first time
    /// (to be diagnosed outside any lock: it may read the executable) and is then turned
    /// into reports by [`Tracker::report`].
    pub fn take_due(&mut self, now_ns: u64) -> Vec<Due> {
        let cutoff = now_ns.saturating_sub(self.grace_ns);
        let mut due = Vec::new();
        self.procs.retain(|&tgid, proc| {
            while proc.pending.front().is_some_and(|p| p.connect.timestamp_ns < cutoff) {
                let p = proc.pending.pop_front().expect("front exists");
                let snapshot = match proc.diagnosis {
                    Some(_) => None,
                    None => Some(std::mem::take(&mut proc.snapshot)),
                };
                if proc.diagnosis.is_none() {
                    // Diagnosed once: later connects of the process reuse it.
                    proc.diagnosis = Some(Diagnosis::default());
                }
                due.push(Due { tgid, connect: p.connect, provider: p.provider, snapshot, diagnosis: None });
            }
            !proc.pending.is_empty()
        });
        self.recent.retain(|_, r| {
            r.retain(|&t| t >= cutoff.saturating_sub(self.grace_ns));
            !r.is_empty()
        });
        self.stats.blind += due.len() as u64;
        due
    }

    /// Reports for `due` (diagnosed), grouped by process and destination, at most one per
    /// pair per `repeat`.
    pub fn report(&mut self, now_ns: u64, time: &str, due: Vec<Due>) -> Vec<BlindSpot> {
        let mut reports: Vec<BlindSpot> = Vec::new();
        for d in due {
            let diagnosis = match d.diagnosis {
                Some(diag) => {
                    self.diagnosed.insert(d.tgid, diag.clone());
                    diag
                }
                None => self.diagnosed.get(&d.tgid).cloned().unwrap_or_default(),
            };
            let diagnosis = if d.connect.udp { quic(diagnosis) } else { diagnosis };
            let key = (d.tgid, d.connect.dest);
            let dest = d.connect.dest.to_string();
            if let Some(r) = reports.iter_mut().find(|r| r.pid == d.tgid && r.dest == dest) {
                // Reported in this round: one more connect of it.
                r.connects += 1;
                continue;
            }
            let entry = self.reported.entry(key).or_insert((0, 0));
            entry.1 += 1;
            if entry.0 != 0 && now_ns.saturating_sub(entry.0) < self.repeat_ns {
                continue;
            }
            let connects = std::mem::take(&mut entry.1);
            entry.0 = now_ns.max(1);
            reports.push(BlindSpot {
                time: time.to_owned(),
                pid: d.tgid,
                tid: d.connect.tid,
                comm: d.connect.comm,
                cgroup_id: d.connect.cgroup_id,
                exe: diagnosis.exe.clone(),
                dest,
                provider: d.provider,
                connects,
                stack: diagnosis.stack,
                reason: diagnosis.reason,
                grace_ms: self.grace_ns / 1_000_000,
                sni: d.connect.sni.map(|s| s.host),
            });
        }
        // Pairs quiet for a whole repeat period are forgotten, and so are the diagnoses of
        // processes with nothing pending (bounded by the processes seen).
        let repeat = self.repeat_ns;
        self.reported.retain(|_, (at, pending)| *pending > 0 || now_ns.saturating_sub(*at) < repeat);
        if self.diagnosed.len() > MAX_PROCESSES {
            let procs = &self.procs;
            self.diagnosed.retain(|tgid, _| procs.contains_key(tgid));
        }
        self.stats.reports += reports.len() as u64;
        reports
    }

    /// Unexplained connects held now.
    pub fn pending(&self) -> usize {
        self.procs.values().map(|p| p.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Tracker {
        /// [`Tracker::take_due`], each diagnosed by `diagnose`, then [`Tracker::report`], as
        /// the service does across its two threads.
        fn expire(
            &mut self,
            now_ns: u64,
            time: &str,
            mut diagnose: impl FnMut(&mut diagnose::Snapshot) -> Diagnosis,
        ) -> Vec<BlindSpot> {
            let mut due = self.take_due(now_ns);
            for d in &mut due {
                if let Some(s) = d.snapshot.as_mut() {
                    d.diagnosis = Some(diagnose(s));
                }
            }
            self.report(now_ns, time, due)
        }
    }

    const MS: u64 = 1_000_000;

    fn net(addr: &str, prefix: u8) -> IpNet {
        IpNet::new(addr.parse().unwrap(), prefix).unwrap()
    }

    fn endpoints() -> Endpoints {
        Endpoints(vec![Endpoint { provider: "openai".into(), nets: vec![net("203.0.113.0", 24)], ports: vec![443] }])
    }

    fn connect(tgid: u32, at_ms: u64, dest: &str) -> Connect {
        Connect {
            timestamp_ns: at_ms * MS,
            tgid,
            tid: tgid,
            cgroup_id: 1,
            dest: dest.parse().unwrap(),
            comm: "client".into(),
            udp: false,
            sni: None,
        }
    }

    fn rustls(_: u32) -> diagnose::Snapshot {
        diagnose::Snapshot::default()
    }

    fn said_rustls(_: &mut diagnose::Snapshot) -> Diagnosis {
        Diagnosis { stack: "rustls", reason: "rustls is not hooked".into(), exe: None }
    }

    /// A UDP flow (QUIC) is never explained by plaintext, even the process's own TCP
    /// connection's right after it, and is reported with the stack `quic` whatever the
    /// process's TLS stack.
    #[test]
    fn a_udp_flow_is_never_explained_and_is_reported_as_quic() {
        let mut t = Tracker::new(endpoints(), 1000 * MS, 60_000 * MS);
        let udp = Connect { udp: true, ..connect(10, 100, "203.0.113.5:443") };
        t.plaintext_seen(10, 90 * MS);
        t.on_connect(udp.clone(), rustls);
        t.plaintext_seen(10, 150 * MS);
        let reports = t.expire(5000 * MS, "t", said_rustls);
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(reports[0].stack, "quic");
        assert!(reports[0].reason.contains("QUIC"), "{}", reports[0].reason);
        assert_eq!(t.stats(), Stats { connects: 1, blind: 1, reports: 1, ..Stats::default() });
        // The same process's TCP connect is still explained by its plaintext.
        t.on_connect(connect(10, 6000, "203.0.113.5:443"), rustls);
        t.plaintext_seen(10, 6001 * MS);
        assert_eq!(t.stats().explained, 1);
    }

    /// A connect named by its ClientHello's server name goes to that name's provider, though
    /// its address is no known endpoint: explained by plaintext as any other, or reported
    /// with the name.
    #[test]
    fn a_connect_named_by_its_server_name_is_followed_at_any_address() {
        let mut t = Tracker::new(endpoints(), 1000 * MS, 60_000 * MS);
        let named = |tgid, at| Connect {
            sni: Some(SniName { host: "gw.llm.example".into(), provider: "azure".into() }),
            ..connect(tgid, at, "198.51.100.7:8443")
        };
        assert!(!t.is_model_endpoint(&connect(10, 100, "198.51.100.7:8443")));
        assert!(t.is_model_endpoint(&named(10, 100)));
        t.on_connect(named(10, 100), rustls);
        t.plaintext_seen(10, 150 * MS);
        t.on_connect(named(11, 100), rustls);
        let reports = t.expire(5000 * MS, "t", said_rustls);
        assert_eq!(reports.len(), 1, "{reports:?}");
        let r = &reports[0];
        assert_eq!(
            (r.pid, r.dest.as_str(), r.provider.as_str(), r.sni.as_deref()),
            (11, "198.51.100.7:8443", "azure", Some("gw.llm.example"))
        );
        assert_eq!(t.stats(), Stats { connects: 2, explained: 1, blind: 1, reports: 1, ..Stats::default() });
        let json = serde_json::to_value(r).unwrap();
        assert_eq!(json["sni"], "gw.llm.example");
        // A connect named by its address says no name.
        t.on_connect(connect(12, 6000, "203.0.113.5:443"), rustls);
        let reports = t.expire(9000 * MS, "t", said_rustls);
        assert!(serde_json::to_value(&reports[0]).unwrap().get("sni").is_none());
    }

    #[test]
    fn plaintext_after_the_connect_explains_it_in_either_arrival_order() {
        let mut t = Tracker::new(endpoints(), 1000 * MS, 60_000 * MS);
        // Connect event first, then the plaintext.
        t.on_connect(connect(10, 100, "203.0.113.5:443"), rustls);
        t.plaintext_seen(10, 150 * MS);
        // Plaintext first (its ring was read earlier), then the connect it follows.
        t.plaintext_seen(11, 250 * MS);
        t.on_connect(connect(11, 200, "203.0.113.5:443"), rustls);
        assert!(t.expire(5000 * MS, "t", said_rustls).is_empty());
        assert_eq!(t.stats(), Stats { connects: 2, explained: 2, ..Stats::default() });
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn unexplained_connects_are_reported_once_per_pair_and_counted() {
        let mut t = Tracker::new(endpoints(), 1000 * MS, 60_000 * MS);
        // Plaintext of the same process from before the connect explains nothing.
        t.plaintext_seen(10, 50 * MS);
        t.on_connect(connect(10, 100, "203.0.113.5:443"), rustls);
        t.on_connect(connect(10, 120, "203.0.113.5:443"), rustls);
        // Not a model endpoint: not followed.
        t.on_connect(connect(10, 130, "198.51.100.1:443"), rustls);
        // Another process's plaintext explains nothing of process 10.
        t.plaintext_seen(12, 140 * MS);
        assert!(t.expire(900 * MS, "t", said_rustls).is_empty(), "still within the grace");
        let r = t.expire(1200 * MS, "t", said_rustls);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!((r[0].pid, r[0].dest.as_str(), r[0].connects), (10, "203.0.113.5:443", 2));
        assert_eq!((r[0].provider.as_str(), r[0].stack), ("openai", "rustls"));
        // Again within the repeat period: counted, not reported.
        t.on_connect(connect(10, 2000, "203.0.113.5:443"), rustls);
        assert!(t.expire(4000 * MS, "t", said_rustls).is_empty());
        // After it: reported with the connects since the last report.
        t.on_connect(connect(10, 70_000, "203.0.113.5:443"), rustls);
        let r = t.expire(72_000 * MS, "t", said_rustls);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].connects, 2);
        assert_eq!(t.stats(), Stats { connects: 4, explained: 0, blind: 4, reports: 2, overflow: 0, other: 1 });
    }

    #[test]
    fn plaintext_past_the_grace_does_not_explain_a_connect() {
        let mut t = Tracker::new(endpoints(), 1000 * MS, 60_000 * MS);
        t.on_connect(connect(10, 100, "203.0.113.5:443"), rustls);
        t.plaintext_seen(10, 1500 * MS);
        assert_eq!(t.expire(1200 * MS, "t", said_rustls).len(), 1);
    }

    #[test]
    fn tables_are_bounded_and_overflow_is_counted() {
        let mut t = Tracker::new(endpoints(), 1000 * MS, 60_000 * MS);
        for i in 0..(MAX_PENDING as u64 + 10) {
            t.on_connect(connect(10, 100 + i, "203.0.113.5:443"), rustls);
        }
        assert_eq!(t.pending(), MAX_PENDING);
        assert_eq!(t.stats().overflow, 10);
        for i in 0..(MAX_RECENT as u64 * 3) {
            t.plaintext_seen(20, i * MS);
        }
        assert!(t.recent[&20].len() <= MAX_RECENT);
    }

    #[test]
    fn watched_ports_come_from_the_endpoints() {
        let mut e = endpoints();
        assert_eq!(e.ports(), Some(vec![443]));
        e.0.push(Endpoint { provider: "local".into(), nets: vec![net("127.0.0.1", 32)], ports: vec![] });
        assert_eq!(e.ports(), None);
        assert_eq!(e.provider_of("127.0.0.1:8000".parse().unwrap()), Some("local"));
        assert_eq!(e.provider_of("[::ffff:203.0.113.9]:443".parse().unwrap()), Some("openai"));
        assert_eq!(e.provider_of("203.0.113.9:80".parse().unwrap()), None);
    }
}
