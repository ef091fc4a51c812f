//! The blind-spot service: two threads around a shared [`Tracker`].
//!
//! - `aegis-blindspot` reads the connect watch and the SNI watch ([`sni`]) as their events
//!   come (at least every [`TICK`]) and the UDP socket tables every [`udp::POLL`], feeds the
//!   tracker (which looks at each new process at once), hands what stayed unexplained to
//!   `aegis-diagnose`, and keeps the counts `status` shows;
//! - `aegis-diagnose` diagnoses and reports it, outside the tracker's lock (capture's
//!   workers tell the tracker about new connections and must never wait for an executable
//!   being read), and without holding the watch up;
//! - `aegis-endpoints` refreshes the known model endpoints (the providers' addresses) every
//!   `resolve_secs`, so slow or failing DNS never holds the watch up.

use std::{
    collections::HashSet,
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
        mpsc::SyncSender,
    },
    thread::JoinHandle,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{BlindSpot, Endpoints, Stats, Tracker, diagnose, sni, udp, watch::ConnectWatch};

/// Processes remembered as sent to scoped capture (forgotten all at once past this).
const MAX_SENT: usize = 65_536;

/// How often due connects are reported at least (the watch's ring is read as soon as it
/// has a connect).
pub const TICK: Duration = Duration::from_millis(200);

/// `[blind_spots]` of the agent's config.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Watch connects to model endpoints and report those whose plaintext is never seen.
    pub enabled: bool,
    /// How long capture has to see a connection's plaintext after its connect.
    pub grace_ms: u64,
    /// A process and destination already reported are reported again at most this often.
    pub repeat_secs: u64,
    /// How often the providers' host names are resolved to know their addresses.
    pub resolve_secs: u64,
    /// Also follow TLS connections whose ClientHello names a provider, at any address (a
    /// packet socket that reads only outgoing ClientHellos). Off by default: every packet
    /// of the host passes the socket's filter, and each outgoing one is cloned for it first
    /// (a non-AI TLS loop on loopback ran 8% slower with it).
    pub sni: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self { enabled: true, grace_ms: 10_000, repeat_secs: 300, resolve_secs: 300, sni: false }
    }
}

/// Counts for `status` (the tracker's and the kernel's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Connects to a known model endpoint.
    pub connects: u64,
    pub explained: u64,
    /// Unexplained after the grace.
    pub blind: u64,
    /// `blind_spot` records written.
    pub reports: u64,
    /// Connects not followed: the tables were full.
    pub overflow: u64,
    /// Connects the kernel could not report: its ring was full.
    pub events_lost: u64,
    /// Known model endpoints (providers with an address).
    pub endpoints: u64,
    /// Connected UDP sockets (QUIC) to a model endpoint found, of `connects` when their
    /// process was named.
    #[serde(default)]
    pub udp_flows: u64,
    /// Of those, gone or held by no process visible here before they were named.
    #[serde(default)]
    pub udp_unowned: u64,
    /// The SNI watch: None when it is off (`sni = false`) or could not start (said in the
    /// log).
    #[serde(default)]
    pub sni: Option<sni::SniCounts>,
}

/// What capture's connection tables tell the tracker. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    tracker: Arc<Mutex<Tracker>>,
}

impl Handle {
    /// An empty tracker for `settings`, to give capture before the service starts.
    pub fn new(settings: &Settings) -> Self {
        let grace = settings.grace_ms.max(1) * 1_000_000;
        let repeat = settings.repeat_secs.saturating_mul(1_000_000_000);
        Self { tracker: Arc::new(Mutex::new(Tracker::new(Endpoints::default(), grace, repeat))) }
    }

    /// Capture started following a connection of `tgid` (its first event at `timestamp_ns`).
    pub fn plaintext_seen(&self, tgid: u32, timestamp_ns: u64) {
        lock(&self.tracker).plaintext_seen(tgid, timestamp_ns);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running service; stopping (or dropping) it detaches the watch.
pub struct Service {
    handle: Handle,
    counts: Arc<Mutex<Counts>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// The provider a host name belongs to, if any.
pub type ProviderForHost = dyn Fn(&str) -> Option<String> + Send;

/// Where the service's parts come from.
pub struct Parts {
    pub watch: ConnectWatch,
    /// Every known model endpoint, now (may resolve host names: slow).
    pub endpoints: Box<dyn Fn() -> Endpoints + Send>,
    /// The provider a host name belongs to (names only: no lookup).
    pub provider_for_host: Box<ProviderForHost>,
    /// Whether capture's probes are on a file.
    pub probed: Box<dyn Fn(&Path) -> bool + Send>,
    pub capture_active: bool,
    /// Where reports go (the records).
    pub report: Box<dyn Fn(BlindSpot) + Send>,
    /// Scoped capture (`capture.scope = "model_processes"`): each process that connects to
    /// a model endpoint is sent here to get capture's probes.
    pub attach: Option<SyncSender<crate::capture::scope::ProbeRequest>>,
}

impl Service {
    /// Start the threads around `handle`'s tracker.
    pub fn start(settings: &Settings, parts: Parts, handle: Handle) -> std::io::Result<Self> {
        let Parts { mut watch, endpoints, provider_for_host, probed, capture_active, report, attach } = parts;
        let mut hellos = match settings.sni.then(sni::SniWatch::open) {
            None => None,
            Some(Ok(w)) => Some(w),
            Some(Err(e)) => {
                tracing::warn!(
                    error = %e,
                    "the SNI watch cannot start: connections are followed by their address only, so one to a \
                     provider address the agent does not know is not reported (blind_spots.sni = false turns \
                     the watch off)"
                );
                None
            }
        };
        let scoped = attach.is_some();
        let tracker = handle.tracker.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Mutex::new(Counts::default()));
        // The endpoints thread hands new address sets (and their ports) to the watch thread.
        let fresh: Arc<Mutex<Option<Endpoints>>> = Arc::default();
        let mut threads = Vec::new();
        {
            let (stop, fresh) = (stop.clone(), fresh.clone());
            let every = Duration::from_secs(settings.resolve_secs.max(1));
            // Not joined at stop: a round of lookups may wait on a hung resolver; the thread
            // sees `stop` when it returns and ends, holding nothing but the book.
            drop(std::thread::Builder::new().name("aegis-endpoints".into()).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    *lock(&fresh) = Some(endpoints());
                    let mut waited = Duration::ZERO;
                    while waited < every && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        waited += TICK;
                    }
                }
            })?);
        }
        // Blind connects go to their own thread to be diagnosed (which may read a large
        // executable) and reported, so the watch thread keeps reading connects and looks at
        // each new process at once, before a short-lived one is gone.
        let (to_diagnose, due_rx) = std::sync::mpsc::channel::<(u64, Vec<super::Due>)>();
        {
            let tracker = tracker.clone();
            threads.push(std::thread::Builder::new().name("aegis-diagnose".into()).spawn(move || {
                // Ends when the watch thread has sent its last and dropped its sender.
                while let Ok((now, mut due)) = due_rx.recv() {
                    for d in &mut due {
                        if let Some(s) = d.snapshot.as_mut() {
                            d.diagnosis = Some(diagnose::diagnose(s, &*probed, capture_active, scoped));
                        }
                    }
                    let time = crate::clock::rfc3339_ms(crate::clock::now_unix_ms());
                    let reports = lock(&tracker).report(now, &time, due);
                    for r in reports {
                        tracing::warn!(
                            pid = r.pid,
                            comm = %r.comm,
                            dest = %r.dest,
                            provider = %r.provider,
                            stack = r.stack,
                            reason = %r.reason,
                            "blind spot: a process talks to a model endpoint and capture sees none of it"
                        );
                        report(r);
                    }
                }
            })?);
        }
        {
            let (stop, tracker, counts) = (stop.clone(), tracker.clone(), counts.clone());
            threads.push(std::thread::Builder::new().name("aegis-blindspot".into()).spawn(move || {
                let mut endpoint_count = 0u64;
                // The tracker's endpoints, for the UDP poller and the SNI watch.
                let mut known = Endpoints::default();
                // Processes sent to be probed (scoped capture), so each is sent once.
                let mut sent: HashSet<u32> = HashSet::new();
                let mut udp = udp::UdpPoller::default();
                let mut polled = std::time::Instant::now();
                loop {
                    let stopping = stop.load(Ordering::Relaxed);
                    if let Some(e) = lock(&fresh).take() {
                        endpoint_count = e.0.iter().filter(|p| !p.nets.is_empty()).count() as u64;
                        if let Err(err) = watch.set_ports(e.ports().as_deref()) {
                            tracing::warn!(error = %format!("{err:#}"), "cannot update the ports the connect watch sees");
                        }
                        known = e.clone();
                        lock(&tracker).set_endpoints(e);
                    }
                    let mut connects = watch.events();
                    let now = crate::clock::monotonic_ns();
                    if polled.elapsed() >= udp::POLL {
                        polled = std::time::Instant::now();
                        connects.extend(udp.poll(&known, now));
                    }
                    if let Some(h) = hellos.as_mut() {
                        let found = h.poll(&known, &*provider_for_host);
                        connects.extend(h.connects(found));
                    }
                    let due = {
                        let mut t = lock(&tracker);
                        for c in connects {
                            let (tgid, at) = (c.tgid, c.timestamp_ns);
                            // Scoped capture: the process goes to be probed before anything
                            // else is done with its connect (the snapshot reads its files),
                            // since its first call races its probes.
                            if let Some(tx) = &attach
                                && !c.udp
                                && !sent.contains(&tgid)
                                && t.is_model_endpoint(&c)
                            {
                                if sent.len() >= MAX_SENT {
                                    sent.clear();
                                }
                                sent.insert(tgid);
                                // A full queue: this process is probed at its next connect.
                                if tx.try_send(crate::capture::scope::ProbeRequest::connect(tgid, at)).is_err() {
                                    sent.remove(&tgid);
                                }
                            }
                            t.on_connect(c, diagnose::Snapshot::take);
                        }
                        t.take_due(now)
                    };
                    if !due.is_empty() {
                        let _ = to_diagnose.send((now, due));
                    }
                    let stats = lock(&tracker).stats();
                    let sni = hellos.as_ref().map(|h| h.counts);
                    *lock(&counts) = counts_of(stats, watch.counts(), endpoint_count, udp.counts, sni);
                    if stopping {
                        break;
                    }
                    watch.wait(TICK, hellos.as_ref().map(sni::SniWatch::fd));
                }
            })?);
        }
        Ok(Self { handle, counts, stop, threads })
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// A reader of the counts, for `status`.
    pub fn counts(&self) -> Arc<Mutex<Counts>> {
        self.counts.clone()
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.halt();
    }
}

fn counts_of(
    stats: Stats,
    kernel: super::watch::KernelCounts,
    endpoints: u64,
    udp: udp::UdpCounts,
    sni: Option<sni::SniCounts>,
) -> Counts {
    Counts {
        connects: stats.connects,
        explained: stats.explained,
        blind: stats.blind,
        reports: stats.reports,
        overflow: stats.overflow,
        events_lost: kernel.lost,
        endpoints,
        udp_flows: udp.flows,
        udp_unowned: udp.unowned,
        sni,
    }
}
