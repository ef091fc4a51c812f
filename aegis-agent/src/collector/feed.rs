//! The agent's end of the fleet policy feed: a long poll to the collector (one request in
//! flight, answered the moment a policy is published), a watched drop directory, the
//! checks of [`crate::fleet::policy`], the change through the control server (the same
//! steps as an operator's block: audited, saved, enforced), and a signed acknowledgement.
//!
//! When the collector cannot be reached the feed retries with exponential backoff and
//! jitter (up to `[fleet] backoff_max_secs`); what is in force stays in force. Refused
//! policies are counted by reason and logged, and the agent keeps what it has; it does not
//! ask again for a version it refused, only for a newer one.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use bytes::Bytes;
use tokio::sync::watch;

use super::client::CollectorClient;
use crate::{
    clock::{now_unix_ms, rfc3339_ms},
    control::{FleetApplier, FleetStatus},
    drill::fleet::Launcher,
    evidence::key::HostKey,
    fleet::{
        FleetConfig, PackSwap,
        ack::{Ack, AckStatus},
        drill::{DrillRequest, DrillResult, DrillStatus},
        policy::{self, Accepted, MAX_POLICY_BYTES, Trust},
    },
};

/// Most files of the drop directory looked at per scan.
const MAX_DROP_FILES: usize = 256;

/// Where an offered policy came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Collector,
    DropDir,
    Url,
}

/// The feed's state, shared by its sources.
struct Inner {
    trust: Trust,
    applier: FleetApplier,
    key: HostKey,
    state_file: PathBuf,
    enforcement: &'static str,
    /// Puts a policy's rulepacks in force (None: this agent runs no rules).
    packs: Option<PackSwap>,
    accepted: Option<Accepted>,
    /// The highest version refused: not asked for again.
    refused_version: u64,
    status: FleetStatus,
    /// Acknowledgements not yet taken by the collector (the newest few).
    pending_acks: Vec<Bytes>,
    stale_reported: bool,
    /// Runs the drills policies carry (None: none is run or answered).
    launcher: Option<Launcher>,
    /// The drill request of the policy just put in force (request, version, received ms).
    drill_due: Option<(DrillRequest, u64, u64)>,
    /// Signed drill results not yet taken by the collector (the newest few).
    pending_results: Vec<Bytes>,
    /// Wakes the collector loop from its long poll to send a result.
    wake: Arc<tokio::sync::Notify>,
}

impl Inner {
    fn publish_status(&mut self) {
        let now = now_unix_ms();
        if let Some(a) = &self.accepted {
            self.status.version = a.version;
            self.status.digest = a.digest.clone();
            self.status.applied_at = a.accepted_at.clone();
            self.status.expires = a.expires.clone();
            self.status.stale = a.is_stale(now);
            if self.status.stale && !self.stale_reported {
                self.stale_reported = true;
                tracing::error!(
                    version = a.version, expires = %a.expires,
                    "the fleet policy in force has expired and no newer one came: the feed is frozen (its blocks stay \
                     in force); check the collector and the fleet's publisher"
                );
            }
        }
        self.status.acks_pending = self.pending_acks.len() as u64;
        self.applier.set_status(self.status.clone());
    }

    /// Verify, apply and acknowledge one offered policy.
    fn offer(&mut self, bytes: &[u8], source: Source) -> Ack {
        let received = now_unix_ms();
        let started = Instant::now();
        let mut ack = Ack {
            fleet: self.trust.fleet.clone(),
            host: self.key.name().to_owned(),
            offered_version: 0,
            status: AckStatus::Refused,
            version: self.accepted.as_ref().map_or(0, |a| a.version),
            digest: self.accepted.as_ref().map(|a| a.digest.clone()).unwrap_or_default(),
            received_unix_ms: received,
            applied_unix_ms: None,
            apply_ms: 0.0,
            enforcement: self.enforcement.to_owned(),
            failures: Vec::new(),
            notes: Vec::new(),
        };
        // The version it claims, for the acknowledgement of a refusal (not trusted).
        ack.offered_version = offered_version(bytes);
        match policy::verify(bytes, &self.trust, self.accepted.as_ref(), received) {
            Err(refusal) => {
                *self.status.refused.entry(refusal.kind().to_owned()).or_default() += 1;
                self.status.last_refusal = format!("{}: {refusal}", rfc3339_ms(received));
                // Not asked for again; only the collector's word counts here (a file in the
                // drop directory could claim any version).
                if source == Source::Collector {
                    self.refused_version = self.refused_version.max(ack.offered_version);
                }
                tracing::warn!(
                    ?source,
                    version = ack.offered_version,
                    reason = refusal.kind(),
                    "fleet policy refused: {refusal}; the policy in force stays"
                );
                ack.failures.push(refusal.to_string());
            }
            Ok(None) => {
                ack.status = AckStatus::InForce;
                ack.applied_unix_ms = self.accepted.as_ref().and_then(|a| parse_ms(&a.accepted_at));
            }
            Ok(Some(v)) => {
                let held_emergency = self.accepted.as_ref().is_some_and(|a| a.emergency);
                let emergency = match (v.doc.emergency, held_emergency) {
                    (true, _) => Some(true),
                    (false, true) => Some(false),
                    (false, false) => None,
                };
                let held_packs = self.accepted.as_ref().map(|a| a.rulepacks.clone()).unwrap_or_default();
                let applied =
                    self.applier.apply(v.doc.version, &v.doc.blocks, emergency, v.doc.mode, &v.signers).and_then(|r| {
                        if held_packs == v.doc.rulepacks {
                            return Ok(r);
                        }
                        match &self.packs {
                            Some(swap) => swap(&v.doc.rulepacks).map(|names| {
                                let mut r = r;
                                r.notes.push(format!("rulepacks in force: {}", names.join(", ")));
                                r
                            }),
                            None if v.doc.rulepacks.is_empty() => Ok(r),
                            None => {
                                let mut r = r;
                                r.notes.push("the policy's rulepacks are not used: this agent runs no rules".into());
                                Ok(r)
                            }
                        }
                    });
                match applied {
                    Ok(report) => {
                        let now = now_unix_ms();
                        let accepted = Accepted::of(&v, now);
                        if let Err(e) = accepted.save(&self.state_file) {
                            // In force, but a restart would not know it: say so.
                            tracing::error!("{e:#}");
                            ack.notes.push(format!("{e:#}"));
                        }
                        self.accepted = Some(accepted);
                        self.stale_reported = false;
                        ack.status = AckStatus::Applied;
                        ack.version = v.doc.version;
                        ack.digest = v.digest.clone();
                        ack.applied_unix_ms = Some(now);
                        ack.notes.extend(report.notes);
                        if let Some(d) = &v.doc.drill {
                            ack.notes.push(format!("drill {} requested", d.id));
                            self.drill_due = Some((d.clone(), v.doc.version, received));
                        }
                        tracing::warn!(?source, version = v.doc.version, blocks = v.doc.blocks.len(), emergency = v.doc.emergency, note = %v.doc.note, "fleet policy in force");
                    }
                    Err(e) => {
                        ack.status = AckStatus::Failed;
                        if source == Source::Collector {
                            self.refused_version = self.refused_version.max(v.doc.version);
                        }
                        tracing::error!(
                            ?source,
                            version = v.doc.version,
                            "the fleet policy could not be enforced, the previous one stays: {e}"
                        );
                        ack.failures.push(e);
                    }
                }
            }
        }
        ack.apply_ms = started.elapsed().as_secs_f64() * 1000.0;
        ack
    }

    fn queue_result(&mut self, result: &DrillResult) {
        match result.sign(&self.key).map(|e| serde_json::to_vec(&e)) {
            Ok(Ok(bytes)) => {
                self.pending_results.push(Bytes::from(bytes));
                let excess = self.pending_results.len().saturating_sub(8);
                if excess > 0 {
                    tracing::warn!(dropped = excess, "fleet drill results the collector never took are dropped");
                }
                self.pending_results.drain(..excess);
            }
            Ok(Err(e)) => tracing::error!("cannot encode a fleet drill result: {e}"),
            Err(e) => tracing::error!("cannot sign a fleet drill result: {e:#}"),
        }
    }

    fn queue_ack(&mut self, ack: &Ack) {
        match ack.sign(&self.key).map(|e| serde_json::to_vec(&e)) {
            Ok(Ok(bytes)) => {
                self.pending_acks.push(Bytes::from(bytes));
                // Only the latest few matter: the collector keeps each agent's latest.
                let excess = self.pending_acks.len().saturating_sub(8);
                self.pending_acks.drain(..excess);
            }
            Ok(Err(e)) => tracing::error!("cannot encode a fleet acknowledgement: {e}"),
            Err(e) => tracing::error!("cannot sign a fleet acknowledgement: {e:#}"),
        }
    }
}

/// Start the drill of the policy just put in force, if it carries one: on its own thread
/// (a drill takes minutes), its signed result queued for the collector when it ends.
fn start_due_drill(inner: &Arc<Mutex<Inner>>) {
    let (launcher, (request, _, _), seed) = {
        let mut i = lock(inner);
        let (Some(due), Some(launcher)) = (i.drill_due.take(), i.launcher.clone()) else { return };
        let seed = DrillResult {
            fleet: i.trust.fleet.clone(),
            host: i.key.name().to_owned(),
            drill: due.0.id.clone(),
            policy_version: due.1,
            status: DrillStatus::NotRun,
            reason: String::new(),
            received_unix_ms: due.2,
            finished_unix_ms: 0,
            report: None,
        };
        (launcher, due, seed)
    };
    let inner = inner.clone();
    let spawned = std::thread::Builder::new().name("aegis-fleet-drill".into()).spawn(move || {
        let result = launcher.run(&request, seed);
        tracing::warn!(drill = result.drill, status = ?result.status, reason = %result.reason, "fleet drill ended on this host");
        let mut i = lock(&inner);
        i.queue_result(&result);
        i.wake.notify_one();
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the fleet drill's thread: {e}; the drill is not run");
    }
}

fn offered_version(bytes: &[u8]) -> u64 {
    let payload = serde_json::from_slice::<crate::evidence::dsse::Envelope>(bytes)
        .ok()
        .and_then(|e| crate::evidence::dsse::decode_base64(&e.payload));
    payload
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok())
        .and_then(|v| v["version"].as_u64())
        .unwrap_or(0)
}

fn parse_ms(rfc3339: &str) -> Option<u64> {
    crate::evidence::bundle_meta::parse_rfc3339_ms(rfc3339).ok().map(|t| t as u64)
}

/// The running feed: stops on drop.
pub struct FeedGuard {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for FeedGuard {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the fleet feed thread panicked");
        }
    }
}

/// Start the feed of `config` (None when the agent takes no fleet policy). `client`: the
/// collector's, when `[fleet] collector` is on and `[collector] url` is set.
pub fn start(
    config: &FleetConfig,
    applier: FleetApplier,
    key: HostKey,
    client: Option<CollectorClient>,
    enforcement: &'static str,
    packs: Option<PackSwap>,
    launcher: Option<Launcher>,
) -> anyhow::Result<Option<FeedGuard>> {
    if !config.enabled() {
        return Ok(None);
    }
    let trust = config.trust().context("[fleet]")?;
    let accepted = Accepted::load(&config.state_file)?;
    if let Some(a) = &accepted {
        anyhow::ensure!(
            a.fleet == trust.fleet,
            "the fleet state file {} is of fleet {:?}, the config names {:?}: remove the file to join the new fleet",
            config.state_file.display(),
            a.fleet,
            trust.fleet
        );
    }
    // The accepted policy's rulepacks are in memory only: in force again from the start.
    if let (Some(a), Some(swap)) = (&accepted, &packs)
        && !a.rulepacks.is_empty()
    {
        let names = swap(&a.rulepacks)
            .map_err(|e| anyhow::anyhow!("the rulepacks of fleet policy version {} do not load: {e}", a.version))?;
        tracing::info!(version = a.version, packs = ?names, "the fleet policy's rulepacks are in force again");
    }
    let drop_dir = (!config.drop_dir.as_os_str().is_empty()).then(|| config.drop_dir.clone());
    let mut sources = Vec::new();
    if let Some(c) = &client {
        sources.push(c.base_url());
    }
    if let Some(d) = &drop_dir {
        sources.push(format!("dir:{}", d.display()));
    }
    let url = (!config.url.trim().is_empty()).then(|| config.url.trim().to_owned());
    let url_store = match &url {
        Some(u) => {
            sources.push(u.clone());
            Some(open_url(u)?)
        }
        None => None,
    };
    if sources.is_empty() {
        tracing::warn!("[fleet] has a name but no source: set [collector] url, or [fleet] drop_dir");
    }
    let mut inner = Inner {
        status: FleetStatus { fleet: trust.fleet.clone(), sources, ..FleetStatus::default() },
        trust,
        applier,
        key,
        state_file: config.state_file.clone(),
        enforcement,
        packs,
        accepted,
        refused_version: 0,
        pending_acks: Vec::new(),
        stale_reported: false,
        launcher,
        drill_due: None,
        pending_results: Vec::new(),
        wake: Arc::new(tokio::sync::Notify::new()),
    };
    inner.publish_status();
    tracing::info!(fleet = %inner.trust.fleet, version = inner.accepted.as_ref().map_or(0, |a| a.version), "fleet feed starting");
    let inner = Arc::new(Mutex::new(inner));
    let (stop, stop_rx) = watch::channel(false);
    let wait = Duration::from_secs(config.wait_secs.max(1));
    let backoff_max = Duration::from_secs(config.backoff_max_secs.max(1));
    let poll = Duration::from_secs(config.poll_secs.max(1));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("aegis-fleet")
        .build()
        .context("cannot start the fleet feed's runtime")?;
    let thread = std::thread::Builder::new()
        .name("aegis-fleet".into())
        .spawn(move || {
            runtime.block_on(async move {
                let collector =
                    client.map(|c| tokio::spawn(collector_loop(c, inner.clone(), wait, backoff_max, stop_rx.clone())));
                let dir = drop_dir.map(|d| tokio::spawn(drop_dir_loop(d, inner.clone(), stop_rx.clone())));
                let polled = url_store.map(|(store, path)| {
                    tokio::spawn(url_loop(
                        store,
                        path,
                        url.clone().unwrap_or_default(),
                        inner.clone(),
                        poll,
                        stop_rx.clone(),
                    ))
                });
                for task in [collector, dir, polled].into_iter().flatten() {
                    let _ = task.await;
                }
            });
        })
        .context("cannot start the fleet feed's thread")?;
    Ok(Some(FeedGuard { stop, thread: Some(thread) }))
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn collector_loop(
    client: CollectorClient,
    inner: Arc<Mutex<Inner>>,
    wait: Duration,
    backoff_max: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        if *stop.borrow() {
            return;
        }
        // Acknowledgements first: the collector learns what is in force before anything else.
        let acks: Vec<Bytes> = lock(&inner).pending_acks.clone();
        let sent = send_all(&acks, "acknowledgement", |b| client.ack(b)).await;
        {
            let mut i = lock(&inner);
            let n = sent.min(i.pending_acks.len());
            i.pending_acks.drain(..n);
            i.publish_status();
        }
        let results: Vec<Bytes> = lock(&inner).pending_results.clone();
        let delivered = send_all(&results, "drill result", |b| client.drill_result(b)).await;
        if delivered > 0 {
            let mut i = lock(&inner);
            let n = delivered.min(i.pending_results.len());
            i.pending_results.drain(..n);
        }
        let wake = lock(&inner).wake.clone();
        let after = {
            let i = lock(&inner);
            i.accepted.as_ref().map_or(0, |a| a.version).max(i.refused_version)
        };
        let polled = tokio::select! {
            r = client.policy(after, wait) => r,
            () = wake.notified() => continue,
            _ = stop.changed() => return,
        };
        let error = match polled {
            Ok(Some((bytes, _published))) => {
                {
                    let mut i = lock(&inner);
                    let ack = i.offer(&bytes, Source::Collector);
                    i.queue_ack(&ack);
                    i.status.connected = true;
                    i.status.last_error.clear();
                    i.publish_status();
                }
                start_due_drill(&inner);
                backoff = Duration::from_millis(250);
                continue;
            }
            Ok(None) if acks.len() == sent && results.len() == delivered => {
                let mut i = lock(&inner);
                i.status.connected = true;
                i.status.last_error.clear();
                i.publish_status();
                backoff = Duration::from_millis(250);
                continue;
            }
            Ok(None) => "acknowledgements or drill results could not be sent".to_owned(),
            Err(e) => e.to_string(),
        };
        {
            let mut i = lock(&inner);
            if i.status.connected || i.status.last_error != error {
                tracing::warn!("fleet feed: cannot reach the collector ({error}); retrying in up to {backoff:?}");
            }
            i.status.connected = false;
            i.status.last_error = error;
            i.publish_status();
        }
        let jittered = backoff.mul_f64(0.5 + jitter() * 0.5);
        tokio::select! {
            () = tokio::time::sleep(jittered) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(backoff_max);
    }
}

/// Send each of `queue` (`what`s) in order until one cannot be sent now; how many went. A
/// refused one counts as gone: sending it again would get the same answer (logged).
async fn send_all<F, Fut>(queue: &[Bytes], what: &str, send: F) -> usize
where
    F: Fn(Bytes) -> Fut,
    Fut: std::future::Future<Output = Result<(), super::client::ClientError>>,
{
    let mut sent = 0;
    for item in queue {
        match send(item.clone()).await {
            Ok(()) => sent += 1,
            Err(super::client::ClientError::Refused { message, .. }) => {
                tracing::error!("the collector refused this agent's {what}: {message}");
                sent += 1;
            }
            Err(_) => break,
        }
    }
    sent
}

/// A number in [0, 1) that differs between agents and tries (no need for a good one).
fn jitter() -> f64 {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    f64::from((nanos ^ std::process::id().wrapping_mul(2_654_435_761)) % 1000) / 1000.0
}

async fn drop_dir_loop(dir: PathBuf, inner: Arc<Mutex<Inner>>, mut stop: watch::Receiver<bool>) {
    let mut seen: HashMap<PathBuf, (SystemTime, u64)> = HashMap::new();
    let mut warned = false;
    loop {
        match scan_drop_dir(&dir, &mut seen) {
            Ok(files) => {
                warned = false;
                for bytes in files {
                    {
                        let mut i = lock(&inner);
                        let ack = i.offer(&bytes, Source::DropDir);
                        i.queue_ack(&ack);
                        i.publish_status();
                    }
                    start_due_drill(&inner);
                }
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!("fleet drop directory {}: {e:#}", dir.display());
            }
            Err(_) => {}
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The object store and path of a policy URL (`https://`, `s3://`, `file://`, ...).
fn open_url(url: &str) -> anyhow::Result<(Box<dyn object_store::ObjectStore>, object_store::path::Path)> {
    let parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("[fleet] url = {url:?}: {e}"))?;
    let options = std::env::vars().filter(|(k, _)| k.starts_with("AWS_")).map(|(k, v)| (k.to_ascii_lowercase(), v));
    object_store::parse_url_opts(&parsed, options).map_err(|e| {
        anyhow::anyhow!("[fleet] url = {url:?}: {e} (https://, s3:// with the AWS_* environment, or file:///)")
    })
}

/// Poll `url` every `every`: when its ETag (or size and modification time) changed, read it
/// (at most [`MAX_POLICY_BYTES`]) and offer it.
async fn url_loop(
    store: Box<dyn object_store::ObjectStore>,
    path: object_store::path::Path,
    url: String,
    inner: Arc<Mutex<Inner>>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    use object_store::ObjectStoreExt as _;
    let mut seen: Option<String> = None;
    let mut failing = false;
    loop {
        let result: Result<Option<Vec<u8>>, String> = async {
            let meta = store.head(&path).await.map_err(|e| e.to_string())?;
            let stamp = format!("{:?}/{}/{}", meta.e_tag, meta.size, meta.last_modified);
            if seen.as_deref() == Some(stamp.as_str()) {
                return Ok(None);
            }
            if meta.size > MAX_POLICY_BYTES {
                seen = Some(stamp);
                return Err(format!("{} bytes, more than a policy's {MAX_POLICY_BYTES}: not read", meta.size));
            }
            let bytes = store.get(&path).await.map_err(|e| e.to_string())?.bytes().await.map_err(|e| e.to_string())?;
            seen = Some(stamp);
            Ok(Some(bytes.to_vec()))
        }
        .await;
        match result {
            Ok(Some(bytes)) => {
                failing = false;
                {
                    let mut i = lock(&inner);
                    let ack = i.offer(&bytes, Source::Url);
                    i.queue_ack(&ack);
                    i.publish_status();
                }
                start_due_drill(&inner);
            }
            Ok(None) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        "fleet policy URL {url}: {e}; the policy in force stays, trying again every {every:?}"
                    );
                }
                failing = true;
                let mut i = lock(&inner);
                i.status.last_error = format!("{url}: {e}");
                i.publish_status();
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The new or changed `*.json` files of `dir`, oldest name first, each at most
/// [`MAX_POLICY_BYTES`] (a larger one is skipped with a warning).
fn scan_drop_dir(dir: &Path, seen: &mut HashMap<PathBuf, (SystemTime, u64)>) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| "cannot list it")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    if names.len() > MAX_DROP_FILES {
        tracing::warn!(
            files = names.len(),
            "fleet drop directory {}: only the last {MAX_DROP_FILES} files are read",
            dir.display()
        );
        names.drain(..names.len() - MAX_DROP_FILES);
    }
    let mut out = Vec::new();
    let mut present = BTreeMap::new();
    for path in names {
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
        present.insert(path.clone(), ());
        if seen.get(&path) == Some(&stamp) {
            continue;
        }
        seen.insert(path.clone(), stamp);
        match crate::files::read_capped(&path, MAX_POLICY_BYTES, "a fleet policy is at most 4 MiB") {
            Ok(bytes) => out.push(bytes),
            Err(e) => tracing::warn!("fleet drop directory: {}: {e}", path.display()),
        }
    }
    seen.retain(|p, _| present.contains_key(p));
    Ok(out)
}
