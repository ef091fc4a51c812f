//! The capture stage and the threads that carry its output to the sinks.
//!
//! ```text
//! ring buffer --reader--> per-worker bounded queues --workers--> output thread
//!   (kernel)    decode,     (a connection always       ConnTable,   Correlator,
//!               dispatch     goes to one worker)       exchanges    JSON lines
//! ```
//! The reader only decodes headers and moves events; parsing and decoding run on the
//! workers. Queues are bounded: when workers fall behind the reader blocks, the ring
//! buffer fills, and the kernel counts what it could not deliver (reported as drops),
//! so nothing is lost silently.
//!
//! [`Progress`] says how far, on the kernel's clock, every worker has got: the output
//! thread waits for it before sending one end of a local call out alone.

pub mod blindspot;
pub mod conn;
pub mod dispatch;
pub mod event;
pub mod gosym;
pub mod probes;
pub mod process;
pub mod procwatch;
pub mod scope;
pub mod targets;

use std::{
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aegis_common::{DROP_CAUSES, DropCounter, StreamKey, StreamPos};

use self::{
    conn::{ConnObservation, ConnStats, ConnTable, EndedLookup, StreamEnd},
    event::{ConnKey, TlsEvent},
    probes::{EventSource, Sources, TlsProbes},
    process::ProcessCache,
    scope::ProbeRequest,
    targets::{Discovery, TlsStack},
};
use crate::{
    clock::{monotonic_ns, wall_offset_ns},
    config::Config,
    enforce::verdict::{Containment, verdict},
    llm::{
        correlate::Correlator,
        exchange::{Observation, Side},
        record::{CallRecord, Endpoint, TlsSource},
    },
    policy::{Inspector, decision::Half, ruling::CallFacts},
    rules::pack::Action,
    sinks::{JsonLines, record::Record},
};

/// Batches queued per worker (each at most [`BATCH`] events). Under load the busiest
/// worker's queue is full and the others' are not, so the two ends of a call, often read by
/// different workers, reach the correlator up to a full queue apart: its halves waiting for
/// their other end must hold that many events' worth (asserted below). At 256 batches, one
/// worker behind by its full queue (`cargo xtask bench capture`, 4 connections on 2
/// workers) kept 4 096 halves waiting, and the correlator sent 23 629 of 130 000 calls out
/// unjoined, as two records each (counted in `correlation_overflowed`).
const WORKER_QUEUE: usize = 64;
/// Events the reader hands to a worker at once: fewer wake-ups than one send per event.
const BATCH: usize = 64;
/// Messages queued for the output thread: workers send one per batch of events (each
/// holding at most that batch's calls and announcements), the daemon one per other record.
const OUTPUT_QUEUE: usize = 256;
/// How often the reader forgets the worker assignments of exited processes.
const FORGET_EXITED_EVERY: Duration = Duration::from_secs(10);
// A call's end has at least two events (its request and its response).
const _: () = assert!(WORKER_QUEUE * BATCH / 2 <= crate::llm::correlate::MAX_PENDING);
pub const TICK: Duration = Duration::from_millis(100);
/// After a drain that found events (fewer than a batch), the reader sleeps this long before
/// the next, instead of waiting in `poll` to be woken by the next event. Under traffic,
/// waking for each event cost more than the events: on the capture bench's /health calls,
/// 56% of the agent's CPU was the kernel switching its threads in and out. With this pause
/// the agent used 17-21 us of CPU per call instead of 52-57 (model calls 81-119 instead
/// of 109-129), and the loop beside it ran 1.3-1.5x faster. An event waits at most this
/// much longer to be read. At 1 ms instead of 250 us the reader drains at most a quarter
/// as often under load, in larger batches: the agent used 54-59 us of CPU per model call
/// instead of 65-69 in runs alternated with the 250 us build (the reader 3 us instead of
/// 5), and a content verdict can come up to 0.75 ms later.
const COALESCE: Duration = Duration::from_micros(1000);

/// Counters shared between the pipeline threads and the reporter.
#[derive(Default)]
pub struct Counters {
    pub events: AtomicU64,
    pub bad_records: AtomicU64,
    pub records: AtomicU64,
    pub joined: AtomicU64,
    /// Calls stopped on the wire (see `enforce::verdict`).
    pub stopped_calls: AtomicU64,
    /// Records waiting in memory for `output.file`, and records it never got.
    pub records_pending: AtomicU64,
    pub records_lost: AtomicU64,
    /// Records that never reached the output thread (its queue was full), counted in
    /// `records_lost` too.
    pub records_unqueued: AtomicU64,
    /// Calls that enforce mode would have stopped, left alone in observe mode.
    pub observed_calls: AtomicU64,
    /// Ends of calls sent out without their other end (see `llm::correlate`), by side, and
    /// of those, the ones sent because too many waited.
    pub alone_client: AtomicU64,
    pub alone_server: AtomicU64,
    pub correlation_overflowed: AtomicU64,
    pub worker_stats: Mutex<Vec<ConnStats>>,
    /// When the ring buffer reader and the output thread last went round their loops
    /// (monotonic ns; 0: not yet, or no reader because capture is unavailable). Each goes
    /// round at least every [`TICK`] while it is not stuck: the health report reads them.
    pub reader_beat_ns: AtomicU64,
    pub output_beat_ns: AtomicU64,
}

/// What capture brings to the pipeline.
pub struct CaptureParts {
    /// Attached already.
    pub probes: TlsProbes,
    /// Has done its first scan; keeps looking when `capture.rediscover_secs` is set.
    pub discovery: Discovery,
    /// None when capture is unavailable (its companions still follow targets).
    pub source: Option<EventSource>,
    /// Told about every connection capture starts following (the blind-spot report).
    pub blind_spots: Option<blindspot::service::Handle>,
    /// Processes to probe now (scoped capture: they connected to a model endpoint, or
    /// started as a known model client).
    pub attach_requests: Option<Receiver<ProbeRequest>>,
    /// Where the process watch sends the processes to probe at their start (scoped capture).
    pub proc_watch: Option<SyncSender<ProbeRequest>>,
}

/// How often scoped capture detaches the probes of exited processes.
const REAP_EVERY: Duration = Duration::from_secs(5);

/// How far the pipeline is through the kernel's events (monotonic ns, the kernel's clock).
pub struct Progress {
    /// Every event stamped before this was read from the ring and handed to its worker.
    read: AtomicU64,
    /// Per worker: batches handed to it and not yet handled (their observations sent on),
    /// and the stamp of the last event it handled.
    queued: Vec<AtomicU64>,
    handled: Vec<AtomicU64>,
}

impl Progress {
    fn new(workers: usize) -> Self {
        Self {
            read: AtomicU64::new(0),
            queued: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            handled: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Every event stamped before the returned time has been handled and its observations
    /// sent to the output thread. Read it before taking the output queue.
    pub fn watermark(&self) -> u64 {
        let read = self.read.load(Ordering::Acquire);
        let worker = |(queued, handled): (&AtomicU64, &AtomicU64)| {
            if queued.load(Ordering::Acquire) == 0 { read } else { handled.load(Ordering::Acquire) }
        };
        self.queued.iter().zip(&self.handled).map(worker).min().unwrap_or(read)
    }
}

/// A running capture pipeline. [`Pipeline::stop`] detaches the probes, drains what the
/// kernel already sent, finishes open calls and flushes the sinks.
pub struct Pipeline {
    stop: Arc<AtomicBool>,
    stop_discovery: Arc<AtomicBool>,
    /// The process watch: scoped capture's, or host-wide discovery's at exec (ends with
    /// discovery).
    proc_watch: Option<JoinHandle<()>>,
    discovery: Option<JoinHandle<TlsProbes>>,
    reader: Option<JoinHandle<EventSource>>,
    workers: Vec<JoinHandle<()>>,
    output: Option<JoinHandle<()>>,
    pub counters: Arc<Counters>,
    /// Other records for the sinks (blocks until the output thread takes them).
    pub events: SyncSender<Output>,
    /// Kernel drop counters, refreshed by the reader.
    pub drops: Arc<Mutex<[DropCounter; DROP_CAUSES]>>,
}

impl Pipeline {
    /// `probes` are attached already; `discovery` has done its first scan and, when
    /// `capture.rediscover_secs` is set, keeps looking for new libraries and executables.
    /// `source` is None when capture is unavailable (its companions still follow targets).
    pub fn start(
        config: &Config,
        parts: CaptureParts,
        sink: JsonLines,
        inspector: Option<Arc<Inspector>>,
        containment: Containment,
    ) -> anyhow::Result<Self> {
        let CaptureParts { probes, discovery, mut source, blind_spots, attach_requests, proc_watch } = parts;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_discovery = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let drops = Arc::new(Mutex::new([DropCounter::default(); DROP_CAUSES]));
        let n = config.workers();
        let progress = Arc::new(Progress::new(n));
        counters.worker_stats.lock().expect("fresh").resize(n, ConnStats::default());
        let sources = probes.sources.clone();
        let processes = Arc::new(ProcessCache::new(65_536));
        let ended = source.as_mut().and_then(|s| s.ended.take()).map(ended_lookup);

        let (out_tx, out_rx) = sync_channel::<Output>(OUTPUT_QUEUE);
        let events = out_tx.clone();
        let mut senders = Vec::with_capacity(n);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = sync_channel::<Vec<TlsEvent>>(WORKER_QUEUE);
            senders.push(tx);
            let ctx = WorkerCtx {
                index: i,
                table: {
                    let table = ConnTable::new(
                        config.capture.max_connections.div_ceil(n),
                        config.capture.max_body_bytes,
                        config.capture.head_limits(),
                        inspector.clone(),
                    )
                    .with_payloads(config.lookback.enabled && config.lookback.payloads)
                    .with_blind_spots(blind_spots.clone());
                    match &ended {
                        Some(lookup) => table.with_ended(lookup.clone()),
                        None => table,
                    }
                },
                idle: Duration::from_secs(config.capture.idle_timeout_secs),
                sources: sources.clone(),
                processes: processes.clone(),
                out: out_tx.clone(),
                containment: containment.clone(),
                counters: counters.clone(),
                progress: progress.clone(),
                stop: stop.clone(),
            };
            workers.push(spawn(&format!("aegis-worker-{i}"), move || ctx.run(rx))?);
        }
        drop(out_tx);

        let window = Duration::from_millis(config.capture.correlation_window_ms);
        let out_counters = counters.clone();
        let out_progress = progress.clone();
        let output = spawn("aegis-output", move || output_loop(out_rx, sink, window, &out_counters, &out_progress))?;

        let reader_stop = stop.clone();
        let reader_counters = counters.clone();
        let reader_drops = drops.clone();
        let reader_processes = processes.clone();
        // Without capture (the kernel refused it) the workers stay idle; the output thread
        // still carries the other records.
        let capturing = source.is_some();
        let reader = match source {
            Some(source) => Some(spawn("aegis-reader", move || {
                let queues = Queues { senders, progress };
                read_loop(source, queues, &reader_processes, &reader_stop, &reader_counters, &reader_drops)
            })?),
            None => None,
        };

        // Scoped capture probes processes from their start; host-wide capture hands
        // discovery each new process's executable (a program carrying its own TLS is probed
        // at its start, not at the next scan).
        let mut new_executables = None;
        let proc_watch = match (proc_watch, probes.known()) {
            (Some(tx), Some(known)) => {
                let stop = stop_discovery.clone();
                Some(spawn("aegis-procwatch", move || procwatch::run(known, tx, &stop))?)
            }
            (_, None) if config.capture.discover && capturing => {
                let (tx, rx) = sync_channel(EXEC_QUEUE);
                new_executables = Some(rx);
                let stop = stop_discovery.clone();
                Some(spawn("aegis-procwatch", move || procwatch::run_discovery(tx, &stop))?)
            }
            _ => None,
        };
        let every = Duration::from_secs(config.capture.rediscover_secs);
        let capture = config.capture.clone();
        let discovery_stop = stop_discovery.clone();
        let discovery = spawn("aegis-discovery", move || {
            let requests = Requests { attach: attach_requests, executables: new_executables };
            rediscover(probes, discovery, every, &discovery_stop, requests, |d| {
                d.scan(&capture.libraries, &capture.executables, capture.discover)
            })
        })?;

        Ok(Self {
            stop,
            stop_discovery,
            proc_watch,
            discovery: Some(discovery),
            reader,
            workers,
            output: Some(output),
            counters,
            events,
            drops,
        })
    }

    /// Detach, drain, finish what is open, flush. Returns the final drop counters.
    pub fn stop(mut self) -> [DropCounter; DROP_CAUSES] {
        self.stop_discovery.store(true, Ordering::SeqCst);
        if let Some(w) = self.proc_watch.take() {
            let _ = w.join();
        }
        if let Some(d) = self.discovery.take() {
            drop(d.join().expect("discovery thread panicked")); // detaches every probe
        }
        self.stop.store(true, Ordering::SeqCst);
        let source = self.reader.take().map(|r| r.join().expect("reader thread panicked"));
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        // The output thread ends when every sender is gone: ours too (clones handed out
        // must be dropped by their holders before `stop`).
        drop(std::mem::replace(&mut self.events, sync_channel(0).0));
        if let Some(o) = self.output.take() {
            let _ = o.join();
        }
        source.as_ref().map(EventSource::drops).unwrap_or_default()
    }
}

/// Reads (and removes) the kernel's record of where a connection ended, for connections
/// whose `SSL_free` event was lost (see `conn::EndedLookup`).
fn ended_lookup(map: aya::maps::HashMap<aya::maps::MapData, StreamKey, StreamPos>) -> EndedLookup {
    let map = Mutex::new(map);
    Arc::new(move |key: ConnKey| {
        let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
        let key = StreamKey { tgid: key.tgid, _pad: 0, conn: key.conn };
        let end = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(StreamEnd { sent: end.egress, received: end.ingress, turn: end.turns })
    })
}

/// New processes' executables queued for discovery, at most.
const EXEC_QUEUE: usize = 1024;

/// What discovery is asked to act on at once, besides its periodic scans.
struct Requests {
    /// Scoped capture: processes to probe.
    attach: Option<Receiver<ProbeRequest>>,
    /// Host-wide capture: the executables of processes just started.
    executables: Option<Receiver<PathBuf>>,
}

/// Attach to what discovery finds, every `every` (never when zero), until `stop`; with
/// scoped capture, also to each process `requests.attach` names (as soon as it does), and
/// detach what exited processes had; with host-wide capture, also to each new process's
/// executable that carries a TLS stack. Returns the probes so that the caller decides when
/// they are detached.
fn rediscover(
    mut probes: TlsProbes,
    mut discovery: Discovery,
    every: Duration,
    stop: &AtomicBool,
    requests: Requests,
    scan: impl Fn(&mut Discovery) -> Vec<targets::TlsTarget>,
) -> TlsProbes {
    let mut last = Instant::now();
    let mut reaped = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        match (&requests.attach, &requests.executables) {
            (Some(rx), _) => match rx.recv_timeout(TICK) {
                Ok(request) => {
                    probes.attach_process(request);
                    while let Ok(request) = rx.try_recv() {
                        probes.attach_process(request);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(TICK),
            },
            (None, Some(rx)) => match rx.recv_timeout(TICK) {
                Ok(exe) => {
                    let found: Vec<_> = std::iter::once(exe)
                        .chain(rx.try_iter())
                        .filter_map(|exe| discovery.executable(&exe))
                        .collect();
                    if !found.is_empty() {
                        probes.attach(&found);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(TICK),
            },
            (None, None) => std::thread::sleep(TICK),
        }
        if reaped.elapsed() >= REAP_EVERY {
            reaped = Instant::now();
            probes.reap();
        }
        if every.is_zero() || last.elapsed() < every {
            continue;
        }
        last = Instant::now();
        let found = scan(&mut discovery);
        if !found.is_empty() {
            probes.attach(&found);
        }
    }
    probes
}

fn spawn<F, T>(name: &str, f: F) -> anyhow::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    Ok(std::thread::Builder::new().name(name.to_owned()).spawn(f)?)
}

/// The workers' queues, and the progress they report.
struct Queues {
    senders: Vec<SyncSender<Vec<TlsEvent>>>,
    progress: Arc<Progress>,
}

/// Drain the ring buffer, dispatching each event to the worker that owns its connection.
/// At stop, drains what is left (the probes are detached by then) and returns.
fn read_loop(
    mut source: EventSource,
    queues: Queues,
    processes: &ProcessCache,
    stop: &AtomicBool,
    counters: &Counters,
    drops: &Mutex<[DropCounter; DROP_CAUSES]>,
) -> EventSource {
    let Queues { senders: workers, progress } = queues;
    let mut dispatch = dispatch::Dispatch::new(workers.len());
    let mut last_forget = Instant::now();
    let fd = source.events.as_raw_fd();
    let mut last_drops = Instant::now();
    let mut batches: Vec<Vec<TlsEvent>> = (0..workers.len()).map(|_| Vec::with_capacity(BATCH)).collect();
    // Blocks when the worker is behind: back-pressure into the ring.
    let send = |w: usize, batches: &mut Vec<Vec<TlsEvent>>| {
        let batch = std::mem::replace(&mut batches[w], Vec::with_capacity(BATCH));
        if batch.is_empty() {
            return true;
        }
        progress.queued[w].fetch_add(1, Ordering::AcqRel);
        workers[w].send(batch).is_ok()
    };
    loop {
        // Whatever was stamped before now is in the ring, and is handed out below.
        let drained_from = monotonic_ns();
        counters.reader_beat_ns.store(drained_from, Ordering::Relaxed);
        let stopping = stop.load(Ordering::SeqCst);
        let mut workers_gone = false;
        let mut drained = 0usize;
        while let Some(item) = source.events.next() {
            drained += 1;
            match TlsEvent::decode(&item) {
                Ok(ev) => {
                    counters.events.fetch_add(1, Ordering::Relaxed);
                    // Describe the process at the first sign of it, before a short-lived
                    // client can exit (a cache hit otherwise).
                    if ev.offset == 0 {
                        processes.lookup(ev.key.tgid, &ev.comm, ev.uid, ev.cgroup_id);
                    }
                    let w = dispatch.worker(&ev);
                    batches[w].push(ev);
                    if batches[w].len() >= BATCH && !send(w, &mut batches) {
                        workers_gone = true;
                        break;
                    }
                }
                Err(e) => {
                    counters.bad_records.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = ?e, "malformed ring buffer record skipped");
                }
            }
        }
        for w in 0..workers.len() {
            workers_gone |= !send(w, &mut batches);
        }
        progress.read.store(drained_from, Ordering::Release);
        if last_forget.elapsed() >= FORGET_EXITED_EVERY {
            dispatch.forget_exited(dispatch::process_alive);
            last_forget = Instant::now();
        }
        if last_drops.elapsed() >= Duration::from_secs(1) || stopping {
            *drops.lock().unwrap_or_else(|e| e.into_inner()) = source.drops();
            last_drops = Instant::now();
        }
        if stopping || workers_gone {
            return source; // dropping `workers` ends the worker loops
        }
        // Under traffic, let events gather for a moment before the next drain instead of
        // waking for each one (see [`COALESCE`]).
        if drained > 0 && drained < BATCH {
            std::thread::sleep(COALESCE);
            continue;
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, TICK.as_millis() as i32) };
    }
}

struct WorkerCtx {
    index: usize,
    table: ConnTable,
    idle: Duration,
    sources: Sources,
    processes: Arc<ProcessCache>,
    out: SyncSender<Output>,
    containment: Containment,
    counters: Arc<Counters>,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
}

impl WorkerCtx {
    fn run(mut self, rx: Receiver<Vec<TlsEvent>>) {
        let mut found = Vec::new();
        let mut outbox = Vec::new();
        let mut last_sweep = Instant::now();
        loop {
            let mut handled = None;
            match rx.recv_timeout(TICK) {
                Ok(batch) => {
                    let mut now_ns = 0;
                    handled = batch.last().map(|ev| ev.timestamp_ns);
                    for ev in batch {
                        now_ns = ev.timestamp_ns;
                        self.table.on_event(ev, &mut found);
                        if !self.table.checkpoints.is_empty() {
                            self.checkpoints();
                        }
                        let announced = self.table.announced.drain(..);
                        outbox.extend(announced.map(|(fingerprint, side)| Output::Expect(fingerprint, side)));
                    }
                    if last_sweep.elapsed() >= Duration::from_secs(1) {
                        let cutoff = now_ns.saturating_sub(self.idle.as_nanos() as u64);
                        self.table.expire_idle(cutoff, now_ns, &mut found);
                        last_sweep = Instant::now();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.send(&mut found, &mut outbox);
            if let Some(ts) = handled {
                // After the batch's observations went out: see `Progress::watermark`.
                self.progress.handled[self.index].store(ts, Ordering::Release);
                self.progress.queued[self.index].fetch_sub(1, Ordering::AcqRel);
            }
            if let Ok(mut s) = self.counters.worker_stats.lock() {
                s[self.index] = self.table.stats;
            }
        }
        debug_assert!(self.stop.load(Ordering::SeqCst));
        self.table.finish_all(monotonic_ns(), &mut found);
        self.send(&mut found, &mut outbox);
        if let Ok(mut s) = self.counters.worker_stats.lock() {
            s[self.index] = self.table.stats;
        }
    }

    /// Judge the calls that reached a checkpoint; stop those that must not go on, and mark
    /// those that enforce mode would have stopped.
    fn checkpoints(&mut self) {
        let pending = std::mem::take(&mut self.table.checkpoints);
        for c in pending {
            if !self.containment.is_active() && !matches!(c.checkpoint.rules, Some((Action::Block, _))) {
                continue;
            }
            let info = self.processes.lookup(c.key.tgid, &c.comm, c.uid, c.cgroup_id);
            let exe = info.exe.as_deref().map(Path::new);
            let facts = c.checkpoint.facts(c.client, &info.cgroup, exe);
            // One ruling for the kill now and for the record later (see `policy::ruling`).
            let ruling = self.containment.rule(&facts, c.checkpoint.half == Half::Request);
            let judged = verdict(&ruling, c.checkpoint.rules.as_ref());
            self.table.record_ruling(c.key, c.checkpoint.exchange, ruling);
            let Some(verdict) = judged else { continue };
            let enforcement = self.containment.act(&verdict, &c.checkpoint, c.key.tgid, c.key.conn);
            let counter = if verdict.stop { &self.counters.stopped_calls } else { &self.counters.observed_calls };
            counter.fetch_add(1, Ordering::Relaxed);
            self.table.record_enforcement(c.key, c.checkpoint.exchange, enforcement);
        }
    }

    /// Send what the batch found, after `outbox` (its announcements), in one message: one
    /// wake-up of the output thread per batch, not two per end of a call.
    fn send(&self, found: &mut Vec<ConnObservation>, outbox: &mut Vec<Output>) {
        for c in found.drain(..) {
            let info = self.processes.lookup(c.key.tgid, &c.comm, c.uid, c.cgroup_id);
            let (library, stack) =
                self.sources.read().unwrap_or_else(|e| e.into_inner()).get(c.source as usize).map_or_else(
                    || (format!("unknown-source-{}", c.source), None),
                    |t| (t.path.display().to_string(), Some(t.stack)),
                );
            // Events name OpenSSL's functions; say the ones the probes really sat on.
            let hooks = match stack {
                Some(stack) => c.hooks.iter().map(|h| stack.rename(h)).collect(),
                None => c.hooks,
            };
            let tls = TlsSource { library, stack: stack.map(TlsStack::name), hooks };
            let mut obs = c.obs;
            // The caller is known now: decide, with the ruling the call was judged by at its
            // last checkpoint, or (never judged) one made now from the same facts.
            if let Some(inspection) = obs.inspection.take() {
                let ruling = obs.ruling.take().unwrap_or_else(|| {
                    let path = obs.target.as_deref().map(|t| t.split('?').next().unwrap_or_default());
                    let facts = CallFacts {
                        client: obs.side == Side::Client,
                        provider: obs.call.provider,
                        model: obs.call.model.as_deref(),
                        host: obs.host.as_deref(),
                        path,
                        cgroup: &info.cgroup,
                        exe: info.exe.as_deref().map(Path::new),
                    };
                    self.containment.rule(&facts, false)
                });
                obs.decision = Some(inspection.finish_with(&ruling));
            }
            let endpoint = info.endpoint(c.tid, tls);
            outbox.push(Output::Call(obs, endpoint));
        }
        if !outbox.is_empty() {
            // The output thread only ends after every worker; a send cannot fail before.
            let _ = self.out.send(Output::Batch(std::mem::take(outbox)));
        }
    }
}

/// What the output thread writes: calls (joined across ends first) and other events.
#[allow(
    clippy::large_enum_variant,
    reason = "calls are the common case; boxing each would cost an allocation per call"
)]
pub enum Output {
    Call(Observation, Endpoint),
    /// A call whose request one end completed: its observation follows (see
    /// `llm::correlate`).
    Expect(u64, crate::llm::exchange::Side),
    /// Any other record (a refused connect, a gate refusal), written as it is.
    Record(Record),
    /// What a worker's batch of events produced, in order.
    Batch(Vec<Output>),
}

fn output_loop(rx: Receiver<Output>, mut sink: JsonLines, window: Duration, counters: &Counters, progress: &Progress) {
    let mut correlator = Correlator::new(window, wall_offset_ns());
    let mut records = Vec::new();
    fn take(item: Output, correlator: &mut Correlator, records: &mut Vec<CallRecord>, sink: &mut JsonLines) {
        match item {
            Output::Call(obs, endpoint) => correlator.push(obs, endpoint, Instant::now(), records),
            Output::Expect(fingerprint, side) => correlator.expect(fingerprint, side, Instant::now()),
            Output::Record(r) => sink.write(&r),
            Output::Batch(items) => {
                for item in items {
                    take(item, correlator, records, sink);
                }
            }
        }
    }
    loop {
        counters.output_beat_ns.store(monotonic_ns(), Ordering::Relaxed);
        // Before taking the queue: what the workers sent up to the watermark is in it.
        let watermark = progress.watermark();
        match rx.recv_timeout(TICK) {
            Ok(item) => {
                take(item, &mut correlator, &mut records, &mut sink);
                // Take what else is queued, so the sink flushes once per burst.
                while let Ok(item) = rx.try_recv() {
                    take(item, &mut correlator, &mut records, &mut sink);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        correlator.expire(watermark, Instant::now(), &mut records);
        for r in records.drain(..) {
            sink.write(&Record::LlmCall(r));
            counters.records.fetch_add(1, Ordering::Relaxed);
        }
        sink.flush();
        counters.joined.store(correlator.joined, Ordering::Relaxed);
        counters.alone_client.store(correlator.alone_client, Ordering::Relaxed);
        counters.alone_server.store(correlator.alone_server, Ordering::Relaxed);
        counters.correlation_overflowed.store(correlator.overflowed, Ordering::Relaxed);
        let health = sink.file_health();
        counters.records_pending.store(health.pending, Ordering::Relaxed);
        counters.records_lost.store(health.lost + counters.records_unqueued.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    correlator.drain(&mut records);
    counters.alone_client.store(correlator.alone_client, Ordering::Relaxed);
    counters.alone_server.store(correlator.alone_server, Ordering::Relaxed);
    for r in records.drain(..) {
        sink.write(&Record::LlmCall(r));
        counters.records.fetch_add(1, Ordering::Relaxed);
    }
    sink.close();
    let health = sink.file_health();
    if health.pending > 0 {
        tracing::error!(records = health.pending, "output.file could not be written: these records are lost at exit");
    }
    counters.records_pending.store(0, Ordering::Relaxed);
    let unqueued = counters.records_unqueued.load(Ordering::Relaxed);
    counters.records_lost.store(health.lost + health.pending + unqueued, Ordering::Relaxed);
}
