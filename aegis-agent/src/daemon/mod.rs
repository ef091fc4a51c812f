//! `aegis-agent run`: capture, rules, containment and the control socket, together.
//!
//! Start-up asks the kernel what it offers ([`Features`]), then brings up each kernel
//! capability on its own: capture, destination blocks, connection kills, the content gate,
//! the blind-spot watch.
//! One that cannot load is reported once, with its reason and what it means for the
//! operator, and the rest runs; `capabilities.require` names those the host cannot do
//! without. The control socket always runs, so `aegis-agent status` says what this host has.

mod blind_spots;

use std::{
    path::Path,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aegis_common::{DROP_CAUSES, DropCounter};
use anyhow::Context as _;

use crate::{
    capture::{
        CaptureParts, Output, Pipeline,
        probes::{EventSource, TlsProbes},
        targets::{self, TlsTarget},
    },
    config::{Config, FailMode},
    control::{ContainmentOff, ControlHandler, ControlServer, EnforceMode, ServerHandle},
    enforce::{
        connect::{self, ConnectGuard},
        gate::{Gate, GateConfig, GateProbes},
        handler::{Enforcer, ModeFollower, SocketIndex, block_id},
        providers::ProviderBook,
        sockdiag,
        verdict::{ConnectionKiller, Containment, HostBook},
    },
    evidence::recorder::Recorder,
    journal::Ledger,
    kernel::{
        capability::{Capabilities, Capability, CapabilityStatus},
        cgroup2_root,
        features::Features,
    },
    metrics::{Metrics, Sources, server::MetricsServer},
    policy::{Inspector, redact::Redactor, reload},
    rules,
    sdnotify::Notifier,
    sinks::{
        JsonLines,
        record::{ConnectDenied, GateRefused, Identity, Record},
    },
};

/// Containment parts that live as long as the daemon.
struct Enforcement {
    /// The cgroup v2 directory containment is attached to, and its name as
    /// /proc/PID/cgroup shows it ("/" for the whole host).
    cgroup: std::path::PathBuf,
    scope: String,
    enforcer: Arc<Enforcer>,
    fail: FailMode,
}

pub fn run(config: &Config, ready_file: Option<&Path>) -> anyhow::Result<()> {
    preflight()?;
    // SIGHUP reopens the files (see `serve`); until its handler is in place, one (a log
    // rotation while the agent starts) must not end the agent, which is its default.
    // SAFETY: setting a signal's disposition to SIG_IGN runs no code in the handler.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    raise_memlock();
    // One agent per control socket, and one per pin directory.
    let _lock = lock_instance(config)?;
    let _pins = if config.enforce.enabled { connect::lock_pins(&config.enforce.pin_dir)? } else { None };
    let recorder = open_decision_log(config);
    let stop_checkpoints = Arc::new(AtomicBool::new(false));
    let checkpointer = recorder.as_ref().map(|r| r.start_timer(stop_checkpoints.clone())).transpose()?;
    let ledger = recorder.clone().map(|r| r as Arc<dyn Ledger>);
    let features = Features::probe();
    tracing::info!(kernel = features.kernel(), btf = features.btf().is_some(), "checking what this kernel offers");
    let caps = Capabilities::with_ledger(ledger.clone());

    let capture = &config.capture;
    let mut discovery = targets::Discovery::default();
    let found = discovery.scan(&capture.libraries, &capture.executables, capture.discover);
    let inspector = if config.rules.enabled {
        let (engine, policies) = rules::load(&config.rules.packs).context("the configured rulepacks are invalid")?;
        let redactor = Redactor::load_or_create(&config.rules.evidence_key)?;
        for p in engine.packs() {
            tracing::info!(pack = %p.name, version = %p.version, digest = %p.digest, "rulepack in force");
        }
        if let Some(ledger) = &ledger {
            ledger.append("agent_start", &agent_start(config, engine.packs()));
        }
        let classifier = if config.rules.classifier {
            let c = rules::Classifier::embedded(config.rules.classifier_threshold, config.rules.classifier_action)
                .map_err(anyhow::Error::msg)
                .context("the embedded classifier model")?;
            tracing::info!(model = %c.model.version, digest = %c.model.digest, threshold = c.threshold, action = ?c.action, "classifier in force");
            Some(c)
        } else {
            None
        };
        Some(Arc::new(
            Inspector::with_policies(engine, policies, redactor)
                .with_uninspectable(config.enforce.uninspectable)
                .with_classifier(classifier),
        ))
    } else {
        if let Some(ledger) = &ledger {
            ledger.append("agent_start", &agent_start(config, &[]));
        }
        None
    };
    let watch = blind_spots::load(config, &features, &caps);
    let scoped = blind_spots::scoped_capture(config, watch.is_some());
    let (mut probes, source) = start_capture(config, &features, &caps, &found, scoped);
    let capture_active = source.is_some();
    let (attach_tx, attach_requests) = match scoped && capture_active {
        true => {
            let (tx, rx) = std::sync::mpsc::sync_channel(1024);
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };

    let providers = Arc::new(
        ProviderBook::new(&config.providers, config.enforce.resolve.clone())
            .map_err(|e| anyhow::anyhow!("invalid [providers] configuration: {e}"))?,
    );
    let enforcement = start_enforcement(config, &features, &caps, &providers)?;
    let handler: Arc<dyn ControlHandler> = match &enforcement {
        Some(e) => e.enforcer.clone(),
        None => Arc::new(ContainmentOff),
    };
    // Restores the saved blocks and makes the (maybe adopted) kernel rules equal to them.
    let server =
        ControlServer::start_with(config.control.clone(), config.enforce.mode, handler, caps.clone(), ledger.clone())
            .context("cannot start the control socket")?;
    let containment = match &enforcement {
        Some(e) => Containment {
            view: Some(server.view()),
            killer: Some(e.enforcer.clone() as Arc<dyn ConnectionKiller>),
            hosts: Some(e.enforcer.clone() as Arc<dyn HostBook>),
            scope: Some(e.scope.clone()),
            inspector: inspector.clone(),
            drills: Some(server.drills()),
        },
        // Containment off: calls are still ruled (the tenants' policies), never stopped.
        None => Containment { inspector: inspector.clone(), drills: Some(server.drills()), ..Containment::default() },
    };
    let refresher = enforcement.as_ref().map(|e| {
        let enforcer = Arc::downgrade(&e.enforcer);
        providers.start_refresher(move |provider| {
            if let Some(e) = enforcer.upgrade() {
                e.provider_changed(provider);
            }
        })
    });
    let refresher = refresher.transpose().context("cannot start the provider address refresher")?;

    let gate = start_gate(
        config,
        &features,
        &caps,
        &mut probes,
        enforcement.as_ref(),
        inspector.as_deref(),
        server.view().mode(),
    );

    let incidents = crate::evidence::incident::start_watcher(config, ledger.clone())
        .context("cannot start the incident rules ([incidents])")?;
    let (observer, incident_thread) = match incidents {
        Some((w, t)) => (Some(w as Arc<dyn crate::sinks::RecordObserver>), Some(t)),
        None => (None, None),
    };
    let metrics = config.metrics.listen_addr()?.map(|addr| (addr, Arc::new(Metrics::new(&config.metrics))));
    let (otlp, spans) = match config.otlp.enabled() {
        true => {
            let (exporter, queue) = crate::sinks::otlp::Exporter::start(&config.otlp)?;
            (Some(exporter), Some(queue as Arc<dyn crate::sinks::RecordObserver>))
        }
        false => (None, None),
    };
    let sink = JsonLines::open(config.output.stdout, &config.output.file, config.output.max_pending_bytes)?
        .with_observer(observer)
        .with_observer(metrics.as_ref().map(|(_, m)| m.clone() as Arc<dyn crate::sinks::RecordObserver>))
        .with_observer(spans)
        .with_identity(Identity::of_this_host(inspector.clone()))
        .with_lookback(open_lookback(config))
        .with_ledger(ledger.clone())
        .with_drills(Some(server.drills()));
    let reopen_output = sink.reopen_flag();
    let sources_of_probes = probes.sources.clone();
    let blind_spots = watch.as_ref().map(|(h, _)| h.clone());
    let proc_watch = attach_tx.clone();
    let scoped_state = probes.known();
    let parts = CaptureParts { probes, discovery, source, blind_spots, attach_requests, proc_watch };
    let pipeline = Pipeline::start(config, parts, sink, inspector.clone(), containment)?;
    let blind = blind_spots::start(
        blind_spots::Wiring { config, providers: &providers, sources: sources_of_probes, capture_active },
        watch,
        pipeline.events.clone(),
        attach_tx,
    );
    // Capture health for `status`, /healthz and the watchdog; the scrape-time metrics.
    let sources = Sources {
        counters: pipeline.counters.clone(),
        drops: pipeline.drops.clone(),
        caps: caps.clone(),
        inspector: inspector.clone(),
        mode: enforcement.as_ref().map(|_| server.view()),
        blind_spots: blind.as_ref().map(|b| b.counts()),
        scoped: scoped_state,
    };
    let health_slot = server.capture_health();
    health_slot.set({
        let sources = sources.clone();
        move || sources.health()
    });
    let metrics_server = metrics.and_then(|(addr, m)| {
        m.attach(sources.clone());
        MetricsServer::start(addr, m)
            .map_err(|e| tracing::error!(error = %format!("{e:#}"), "metrics and health are not served"))
            .ok()
    });
    let notifier = match Notifier::from_env() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "NOTIFY_SOCKET is set but unusable: systemd is not told when the agent is ready");
            None
        }
    };
    let stop_reload = Arc::new(AtomicBool::new(false));
    let gate_reader = match &gate {
        Some(g) => Some(read_gate(
            g.clone(),
            inspector.clone().expect("the gate runs with rules"),
            pipeline.events.clone(),
            stop_reload.clone(),
        )?),
        None => None,
    };
    let reloader = match &inspector {
        Some(i) if config.rules.reload_secs > 0 && !config.rules.packs.is_empty() => Some(reload::watch(
            i.clone(),
            config.rules.packs.clone(),
            Duration::from_secs(config.rules.reload_secs),
            stop_reload.clone(),
            ledger.clone(),
        )?),
        _ => None,
    };
    // Evidence bundles in the spool go to [collector] url until the agent stops.
    let _shipper = crate::evidence::spool::ShipperGuard::start(&config.collector);
    let feed = start_fleet_feed(config, &server, "kernel", inspector.clone())?;
    let outcome = caps.check_required(&config.capabilities.require).and_then(|()| {
        tracing::info!(
            targets = found.len(),
            workers = config.workers(),
            file = %config.output.file.display(),
            capabilities = %summary(&caps),
            "agent ready"
        );
        // Written once serve's signal handlers are in place: whoever waits for it may
        // send SIGHUP at once.
        let ready = || match ready_file {
            Some(path) => std::fs::write(path, format!("{}\n", std::process::id()))
                .with_context(|| format!("cannot write the ready file {}", path.display())),
            None => Ok(()),
        };
        // SIGHUP (logrotate's postrotate): the records file and the audit log are opened
        // again at their paths.
        let reopen = || {
            tracing::info!("SIGHUP: reopening output.file and the audit log");
            reopen_output.store(true, Ordering::SeqCst);
            if let Err(e) = server.reopen_audit_log() {
                tracing::error!(
                    error = %format!("{e:#}"),
                    "audit lines still go to the file opened before (renamed, if it was rotated)"
                );
            }
        };
        let watch = Watch { notifier: notifier.as_ref(), sources: &sources, caps: &caps };
        serve(&pipeline, enforcement.as_ref(), config.output.stats_interval_secs, &watch, &reopen, ready)
    });

    tracing::info!("stopping: finishing open calls and detaching probes");
    if let Some(n) = &notifier {
        let _ = n.stopping("stopping: finishing open calls and detaching probes");
    }
    drop(metrics_server);
    health_slot.clear();
    stop_reload.store(true, Ordering::SeqCst);
    if let Some(r) = reloader {
        let _ = r.join();
    }
    if let Some(r) = gate_reader {
        let _ = r.join();
    }
    drop(refresher);
    let counters = pipeline.counters.clone();
    let drops_handle = pipeline.drops.clone();
    if let Some(e) = &enforcement {
        forward_denials(&e.enforcer, &pipeline, false);
    }
    // Its last reports go out before the records are closed.
    if let Some(b) = blind {
        b.stop();
    }
    let final_drops = pipeline.stop();
    // The records are all written: the incident thread ends with its queue.
    if let Some(t) = incident_thread {
        let _ = t.join();
    }
    *drops_handle.lock().unwrap_or_else(|e| e.into_inner()) = final_drops;
    // The sinks are closed: the exporter sends what is queued and ends.
    if let Some(e) = otlp {
        e.finish();
    }
    report_counters(&counters, &final_drops);
    drop(feed);
    let nothing_blocked = server.view().blocks().is_empty();
    server.shutdown();
    if let Some(e) = enforcement {
        stop_enforcement(e, nothing_blocked);
    }
    if let Some(ledger) = &ledger {
        let result = match &outcome {
            Ok(()) => serde_json::json!({ "result": "ok" }),
            Err(e) => serde_json::json!({ "result": "failed", "error": format!("{e:#}") }),
        };
        ledger.append("agent_stop", &result);
    }
    stop_checkpoints.store(true, Ordering::SeqCst);
    if let Some(c) = checkpointer {
        let _ = c.join();
    }
    if let Some(r) = &recorder {
        let s = r.stats();
        tracing::info!(
            entries = s.entries,
            appended = s.appended,
            lost = s.lost,
            checkpoints = s.checkpoints,
            checkpoint_errors = s.checkpoint_errors,
            "decision log closed with a checkpoint"
        );
    }
    tracing::info!("stopped; all probes detached");
    outcome
}

/// The fleet policy feed of `[fleet]`, when it names a fleet.
fn start_fleet_feed(
    config: &Config,
    server: &ServerHandle,
    enforcement: &'static str,
    inspector: Option<Arc<Inspector>>,
) -> anyhow::Result<Option<crate::collector::feed::FeedGuard>> {
    if !config.fleet.enabled() {
        return Ok(None);
    }
    let key = crate::evidence::key::HostKey::load_or_create(&config.evidence.key, &config.evidence.key_name()?)
        .context("the fleet's acknowledgements are signed with the host key ([evidence] key)")?
        .0;
    let client = if config.fleet.collector && config.collector.enabled() {
        Some(config.collector.client().context("[fleet] collector = true takes the collector of [collector]")?)
    } else {
        None
    };
    let packs: Option<crate::fleet::PackSwap> = inspector.map(|inspector| {
        let paths = config.rules.packs.clone();
        Arc::new(move |packs: &[crate::fleet::policy::FleetPack]| {
            let pairs = packs.iter().map(crate::fleet::policy::FleetPack::pair).collect();
            let infos = inspector.reload(&paths, Some(pairs)).map_err(|e| e.to_string())?;
            Ok(infos.iter().map(|p| format!("{}@{}", p.name, p.version)).collect())
        }) as crate::fleet::PackSwap
    });
    let launcher =
        crate::drill::fleet::Launcher::new(config.source.clone(), config.fleet.drills, enforcement == "kernel");
    crate::collector::feed::start(
        &config.fleet,
        server.fleet_applier(),
        key,
        client,
        enforcement,
        packs,
        Some(launcher),
    )
    .context("cannot start the fleet feed ([fleet])")
}

/// `aegis-agent run --no-kernel`: the control socket, the decision log and the fleet feed,
/// and no eBPF program at all: no capture, no kernel blocks, no connection kills. Blocks and
/// fleet policies are held (saved, audited, acknowledged as `no_kernel`) and enforced by
/// nothing. For rehearsing a fleet's policy push at scale on one machine (many such agents
/// beside one real one), and for hosts where only the fleet's view is wanted.
pub fn run_without_kernel(config: &Config, ready_file: Option<&Path>) -> anyhow::Result<()> {
    let _lock = lock_instance(config)?;
    let recorder = open_decision_log(config);
    let ledger = recorder.clone().map(|r| r as Arc<dyn Ledger>);
    if let Some(ledger) = &ledger {
        ledger.append("agent_start", &serde_json::json!({ "kernel": "none (--no-kernel)" }));
    }
    let server = ControlServer::start_with(
        config.control.clone(),
        config.enforce.mode,
        Arc::new(crate::control::NoopHandler),
        Capabilities::with_ledger(ledger.clone()),
        ledger.clone(),
    )
    .context("cannot start the control socket")?;
    let feed = start_fleet_feed(config, &server, "no_kernel", None)?;
    tracing::warn!("agent ready WITHOUT kernel programs (--no-kernel): nothing is captured or enforced on this host");
    if let Some(path) = ready_file {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write the ready file {}", path.display()))?;
    }
    // Under systemd (Type=notify, WatchdogSec=): ready now, and alive while this loop runs.
    let notifier = Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!("NOTIFY_SOCKET is set but cannot be used: {e}");
        None
    });
    if let Some(n) = &notifier {
        let _ = n.ready("serving without kernel programs (--no-kernel)");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let outcome = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let watchdog = crate::sdnotify::watchdog_interval();
        let mut beat = tokio::time::interval(
            watchdog.map_or(Duration::from_secs(3600), |w| (w / 2).max(Duration::from_millis(100))),
        );
        loop {
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => break,
                _ = beat.tick(), if watchdog.is_some() => {
                    if let Some(n) = &notifier {
                        let _ = n.watchdog();
                    }
                }
            }
        }
        anyhow::Ok(())
    });
    if let Some(n) = &notifier {
        let _ = n.stopping("stopping");
    }
    drop(feed);
    server.shutdown();
    if let Some(ledger) = &ledger {
        ledger.append("agent_stop", &serde_json::json!({ "result": "ok" }));
    }
    outcome
}

/// The look-back, when `[lookback] enabled`. One that cannot be opened does not stop the
/// agent: snapshots then have nothing to cut from, and the error says so.
fn open_lookback(config: &Config) -> Option<crate::sinks::lookback::Lookback> {
    if !config.lookback.enabled {
        return None;
    }
    match crate::sinks::lookback::Lookback::open(&config.lookback) {
        Ok(l) => {
            tracing::info!(dir = %config.lookback.dir.display(), payloads = config.lookback.payloads, "look-back open");
            Some(l)
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the look-back cannot be opened: snapshots will have no history to cut from");
            None
        }
    }
}

/// The decision log, when `[evidence] enabled`. One that cannot be opened (a damaged log, an
/// unreadable key) does not stop the agent: the error says what to do, and calls are still
/// recorded in the records file.
fn open_decision_log(config: &Config) -> Option<Arc<Recorder>> {
    if !config.evidence.enabled {
        tracing::info!("decision log off ([evidence] enabled = false)");
        return None;
    }
    match Recorder::open(&config.evidence) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(
                error = %format!("{e:#}"),
                "the decision log cannot be opened: decisions and operator actions are NOT kept as signed evidence \
                 until it is fixed (calls are still recorded in output.file)"
            );
            None
        }
    }
}

/// The decision log's first entry of a run: who is deciding, with which rules, in which mode.
fn agent_start(config: &Config, packs: &[crate::rules::engine::PackInfo]) -> serde_json::Value {
    serde_json::json!({
        "agent_version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "host": crate::evidence::key::host_name().ok(),
        "machine_id": crate::files::read_capped_to_string(Path::new("/etc/machine-id"), 4096, "")
            .ok()
            .map(|s| s.trim().to_owned()),
        "packs": packs,
        "enforce": {
            "enabled": config.enforce.enabled,
            "mode": config.enforce.mode,
            "uninspectable": config.enforce.uninspectable,
        },
        "capabilities_required": config.capabilities.require,
        "output_file": config.output.file.display().to_string(),
    })
}

/// What systemd is told: READY=1 once the probes are attached, WATCHDOG=1 while the pipeline
/// turns, and a STATUS= line of capture's health.
struct Watch<'a> {
    notifier: Option<&'a Notifier>,
    sources: &'a Sources,
    caps: &'a Capabilities,
}

impl Watch<'_> {
    fn ready(&self) {
        let Some(n) = self.notifier else { return };
        match n.ready(&self.status_line()) {
            Ok(()) => tracing::info!(socket = n.name(), "told systemd the agent is ready"),
            Err(e) => tracing::warn!(socket = n.name(), error = %e, "cannot tell systemd the agent is ready"),
        }
    }

    /// Feed the watchdog while the pipeline turns; say why not otherwise (systemd then
    /// restarts the agent after `WatchdogSec=`).
    fn beat(&self, watchdog: bool, stalled_before: &mut bool) {
        let Some(n) = self.notifier else { return };
        match self.sources.stalled() {
            None => {
                if watchdog && let Err(e) = n.watchdog() {
                    tracing::warn!(socket = n.name(), error = %e, "cannot feed systemd's watchdog");
                }
                *stalled_before = false;
            }
            Some(why) if !*stalled_before => {
                tracing::error!(reason = %why, "the capture pipeline is stuck: systemd's watchdog is no longer fed");
                *stalled_before = true;
            }
            Some(_) => {}
        }
        let _ = n.status(&self.status_line());
    }

    /// "capture active, healthy: 12 records, 0 lost; destination_blocks=active ...".
    fn status_line(&self) -> String {
        let h = self.sources.health();
        let verdict = if h.healthy { "healthy".to_owned() } else { format!("UNHEALTHY ({})", h.reasons.join("; ")) };
        format!(
            "capture {}, {verdict}: {} records, {} lost, {} kernel drops; {}",
            h.state.name(),
            h.records,
            h.records_lost,
            h.kernel_dropped_events,
            summary(self.caps)
        )
    }
}

/// Until SIGINT or SIGTERM: periodic reports, the containment heartbeat, refused connects
/// and systemd's watchdog; `reopen` on SIGHUP. `ready` (then systemd's READY=1) once the
/// signals are handled.
fn serve(
    pipeline: &Pipeline,
    enforcement: Option<&Enforcement>,
    interval: u64,
    watch: &Watch,
    reopen: &dyn Fn(),
    ready: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        // Both streams are made once: a signal arriving between two turns of the loop is
        // kept for the next turn (a fresh `ctrl_c()` future per turn would miss it).
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        ready()?;
        watch.ready();
        let mut ticker = tokio::time::interval(Duration::from_secs(interval.max(1)));
        ticker.tick().await;
        let mut enforce_tick = tokio::time::interval(Duration::from_millis(100));
        let mut beats = 0u32;
        // Half the watchdog's period, as sd_watchdog_enabled(3) advises; the status line is
        // refreshed with it (every 10 s without a watchdog).
        let watchdog = crate::sdnotify::watchdog_interval();
        let mut watchdog_tick = tokio::time::interval(
            watchdog.map_or(Duration::from_secs(10), |w| (w / 2).max(Duration::from_millis(100))),
        );
        let mut stalled = false;
        loop {
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => break,
                _ = watchdog_tick.tick(), if watch.notifier.is_some() => watch.beat(watchdog.is_some(), &mut stalled),
                _ = hup.recv() => reopen(),
                _ = ticker.tick(), if interval > 0 => report(pipeline),
                _ = enforce_tick.tick(), if enforcement.is_some() => {
                    let e = enforcement.expect("checked");
                    beats += 1;
                    forward_denials(&e.enforcer, pipeline, beats % 10 == 0);
                }
            }
        }
        anyhow::Ok(())
    })
}

/// "capture=active destination_blocks=unavailable ...", for the ready line.
fn summary(caps: &Capabilities) -> String {
    caps.list().iter().map(|c| format!("{}={}", c.name, c.state.name())).collect::<Vec<_>>().join(" ")
}

/// Load capture's programs and attach them to the TLS targets found. When the kernel lacks
/// what capture needs or refuses its programs, capture is unavailable (reported) and the
/// probes only carry their companions.
fn start_capture(
    config: &Config,
    features: &Features,
    caps: &Capabilities,
    found: &[TlsTarget],
    scoped: bool,
) -> (TlsProbes, Option<EventSource>) {
    let unavailable = |reason: String| {
        caps.set(CapabilityStatus::unavailable(Capability::Capture, reason));
        let mut probes = TlsProbes::without_capture();
        probes.attach(found);
        (probes, None)
    };
    let missing = features.missing(&Capability::Capture.needs());
    if !missing.is_empty() {
        return unavailable(format!("this kernel lacks {}", missing.join(", ")));
    }
    if found.is_empty() && !config.capture.discover {
        // Nothing now, and nothing will be looked for: there is nothing to capture.
        return unavailable(
            "no OpenSSL library found to probe, and discovery is off (capture.discover = false): list the \
             library or executable under capture.libraries or capture.executables, or turn discovery on"
                .into(),
        );
    }
    match TlsProbes::load(config.capture.ring_buffer_bytes) {
        Ok((mut probes, source)) => {
            if scoped {
                probes.scope_to_processes(&config.capture.always_probe);
            }
            probes.attach(found);
            probes.report_to(caps.clone());
            (probes, Some(source))
        }
        Err(e) => unavailable(format!("{e:#}")),
    }
}

/// Destination blocks (connect programs, pinned) and connection kills, each on its own;
/// None when containment is off in the configuration. Errors are configuration errors
/// only: what the kernel refuses is reported as a capability state.
fn start_enforcement(
    config: &Config,
    features: &Features,
    caps: &Capabilities,
    providers: &Arc<ProviderBook>,
) -> anyhow::Result<Option<Enforcement>> {
    if !config.enforce.enabled {
        for c in [Capability::DestinationBlocks, Capability::ConnectionKills, Capability::ContentGate] {
            caps.set(CapabilityStatus::off(c, "containment is off in the configuration (enforce.enabled = false)"));
        }
        return Ok(None);
    }
    caps.set(match sockdiag::probe_destroy() {
        Ok(()) => CapabilityStatus::active(Capability::ConnectionKills, "sock_diag SOCK_DESTROY"),
        Err(reason) => CapabilityStatus::unavailable(Capability::ConnectionKills, reason),
    });
    let Some(root) = cgroup2_root() else {
        caps.set(CapabilityStatus::unavailable(Capability::DestinationBlocks, "no cgroup v2 mount on this host"));
        let enforcer = Arc::new(Enforcer::new(None, providers.clone(), "/".into()));
        return Ok(Some(Enforcement { cgroup: "/".into(), scope: "/".into(), enforcer, fail: config.enforce.fail }));
    };
    let cgroup = config.enforce.cgroup_dir()?;
    let missing = features.missing(&Capability::DestinationBlocks.needs());
    let guard = if missing.is_empty() {
        open_connect_guard(config, features, caps, &cgroup)
    } else {
        let reason = format!("this kernel lacks {}", missing.join(", "));
        caps.set(CapabilityStatus::unavailable(Capability::DestinationBlocks, reason));
        None
    };
    let enforcer = Arc::new(Enforcer::new(guard, providers.clone(), root.clone()));
    let scope = crate::enforce::handler::cgroup_name(&root, &cgroup).unwrap_or_else(|| "/".into());
    Ok(Some(Enforcement { cgroup, scope, enforcer, fail: config.enforce.fail }))
}

/// The connect programs on `cgroup`, pinned (adopted from a previous agent when they match).
fn open_connect_guard(
    config: &Config,
    features: &Features,
    caps: &Capabilities,
    cgroup: &Path,
) -> Option<ConnectGuard> {
    let fail = match config.enforce.fail {
        FailMode::Closed => connect::FailMode::Closed,
        FailMode::Open => connect::FailMode::Open { grace: Duration::from_secs(config.enforce.grace_secs.max(1)) },
    };
    let pins = config.enforce.pin_dir.display();
    match ConnectGuard::open(cgroup, &config.enforce.pin_dir, fail) {
        Ok((guard, adopted)) => {
            tracing::info!(cgroup = %cgroup.display(), %pins, adopted = ?adopted, "containment programs in force");
            let detail = format!("connect4/6 and sendmsg4/6 on cgroup {}, pinned in {pins}", cgroup.display());
            caps.set(match features.btf() {
                Some(_) => CapabilityStatus::active(Capability::DestinationBlocks, detail),
                None => CapabilityStatus::degraded(
                    Capability::DestinationBlocks,
                    detail,
                    "no kernel BTF: blocks scoped to an executable (--exe) are refused",
                ),
            });
            Some(guard)
        }
        Err(e) => {
            let reason =
                format!("cannot load the connect programs onto cgroup {} (pins in {pins}): {e:#}", cgroup.display());
            caps.set(CapabilityStatus::unavailable(Capability::DestinationBlocks, reason));
            None
        }
    }
}

fn stop_enforcement(e: Enforcement, nothing_blocked: bool) {
    let Some(guard) = e.enforcer.take_guard() else { return };
    match e.fail {
        // Nothing to keep in force: leave no programs behind.
        FailMode::Closed if nothing_blocked => match guard.remove() {
            Ok(()) => tracing::info!("no block in force: containment programs detached"),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "could not detach the containment programs"),
        },
        FailMode::Closed => {
            guard.release();
            tracing::info!("containment stays in force while the agent is stopped (enforce.fail = \"closed\")");
        }
        FailMode::Open => match guard.remove() {
            Ok(()) => tracing::info!("containment lifted (enforce.fail = \"open\")"),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "could not lift containment"),
        },
    }
}

/// Load the content gate with the packs' kernel keywords and put its SSL_write probes
/// wherever capture's go; it attaches to the enforcement cgroup and refuses only while the
/// agent enforces (`mode`, then every switch through [`GateMode`]), and stands by otherwise.
/// Attached, it also indexes which socket carries each TLS connection, so a stopped call's
/// connection is found exactly. None when it is off or unavailable (reported either way).
fn start_gate(
    config: &Config,
    features: &Features,
    caps: &Capabilities,
    probes: &mut TlsProbes,
    enforcement: Option<&Enforcement>,
    inspector: Option<&Inspector>,
    mode: EnforceMode,
) -> Option<Arc<RwLock<Gate>>> {
    let off = |reason: &str| {
        caps.set(CapabilityStatus::off(Capability::ContentGate, reason));
        None
    };
    let (e, inspector) = match (enforcement, inspector) {
        (None, _) => return None, // reported with the rest of containment
        (Some(_), None) => return off("rules are off (rules.enabled = false)"),
        (Some(_), Some(_)) if !config.enforce.gate.enabled => return off("enforce.gate.enabled = false"),
        (Some(e), Some(i)) => (e, i),
    };
    let unavailable = |reason: String| {
        caps.set(CapabilityStatus::unavailable(Capability::ContentGate, reason));
        None
    };
    let missing = features.missing(&Capability::ContentGate.needs());
    if !missing.is_empty() {
        return unavailable(format!("this kernel lacks {}", missing.join(", ")));
    }
    let mut gc = GateConfig::new(e.cgroup.clone());
    gc.ports = config.enforce.gate.ports.clone();
    gc.kill = true;
    gc.enforcing = mode == EnforceMode::Enforce;
    let mut gate = match Gate::start(&gc) {
        Ok(g) => g,
        Err(err) => return unavailable(format!("{err:#}")),
    };
    let keywords = inspector.engine().kernel_keywords();
    if let Err(err) = gate.set_keywords(&keywords) {
        return unavailable(format!("cannot load the kernel keywords: {err:#}"));
    }
    let programs = gate.programs();
    let gate = Arc::new(RwLock::new(gate));
    probes.add_companion(Box::new(GateProbes(gate.clone())));
    e.enforcer.set_socket_index(Arc::new(GateIndex(gate.clone())));
    let detail =
        format!("{} kernel keyword(s) on ports 443 {:?}, cgroup {}", keywords.len(), gc.ports, e.cgroup.display());
    let follower = Arc::new(GateMode { gate: gate.clone(), caps: caps.clone(), detail, programs });
    follower.report();
    e.enforcer.set_mode_follower(follower);
    Some(gate)
}

/// The content gate following the enforcement mode, and its capability state with it.
struct GateMode {
    gate: Arc<RwLock<Gate>>,
    caps: Capabilities,
    detail: String,
    programs: Vec<crate::kernel::capability::ProgramStatus>,
}

impl GateMode {
    fn report(&self) {
        let status = if self.gate.read().unwrap_or_else(|e| e.into_inner()).enforcing() {
            CapabilityStatus::active(Capability::ContentGate, self.detail.clone())
        } else {
            CapabilityStatus::standby(
                Capability::ContentGate,
                format!(
                    "{}; observe mode: attaches and refuses once enforcement is on (aegis-agent enforce on)",
                    self.detail
                ),
            )
        };
        self.caps.set(status.with_programs(self.programs.clone()));
    }
}

impl ModeFollower for GateMode {
    fn follow(&self, mode: EnforceMode) -> Result<String, String> {
        let on = mode == EnforceMode::Enforce;
        let result = self.gate.write().unwrap_or_else(|e| e.into_inner()).set_enforcing(on);
        self.report();
        match result {
            Ok(()) if on => Ok("the content gate refuses flagged sends".into()),
            Ok(()) => Ok("the content gate stands by".into()),
            Err(e) => Err(format!("the content gate could not follow the mode: {e:#}")),
        }
    }
}

/// An exclusive lock next to the control socket, taken before the pinned state is touched,
/// so a second agent with the same configuration stops instead of adopting the first's pins.
fn lock_instance(config: &Config) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let path = config.control.socket.with_extension("lock");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the instance lock {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        anyhow::bail!(
            "another aegis-agent (pid {}) holds {}: it already enforces this configuration; stop it first \
             (systemctl stop aegis-agent), or give this one its own [control] socket and enforce.pin_dir",
            holder.trim(),
            path.display()
        );
    }
    file.set_len(0)?;
    std::io::Write::write_all(&mut &file, format!("{}\n", std::process::id()).as_bytes())?;
    Ok(file)
}

struct GateIndex(Arc<RwLock<Gate>>);

impl SocketIndex for GateIndex {
    fn socket_of(&self, tgid: u32, conn: u64) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).socket_of(tgid, conn)
    }
}

/// Gate refusals to the log and the sinks, until `stop`; the kernel keywords follow the
/// rulepacks when they are reloaded.
fn read_gate(
    gate: Arc<RwLock<Gate>>,
    inspector: Arc<Inspector>,
    out: std::sync::mpsc::SyncSender<Output>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    Ok(std::thread::Builder::new().name("aegis-gate".into()).spawn(move || {
        let mut engine = inspector.engine();
        while !stop.load(Ordering::SeqCst) {
            let now = inspector.engine();
            if !Arc::ptr_eq(&now, &engine) {
                engine = now;
                let keywords = engine.kernel_keywords();
                match gate.write().unwrap_or_else(|e| e.into_inner()).set_keywords(&keywords) {
                    Ok(()) => tracing::info!(keywords = keywords.len(), "content gate keywords follow the reloaded rulepacks"),
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "the reloaded kernel keywords could not be loaded; the gate keeps the previous ones"),
                }
            }
            let ready = gate.read().unwrap_or_else(|e| e.into_inner()).wait(Duration::from_millis(100));
            if !ready {
                continue;
            }
            let refusals = gate.write().unwrap_or_else(|e| e.into_inner()).poll();
            for r in refusals {
                tracing::warn!(
                    rule = r.rule_id.as_deref().unwrap_or("?"), pid = r.pid, comm = %r.comm, peer = %r.peer,
                    refused_bytes = r.refused_bytes, "request refused in the kernel before it left the host"
                );
                let record = GateRefused {
                    time: crate::clock::rfc3339_ms(crate::clock::now_unix_ms()),
                    exe: std::fs::read_link(format!("/proc/{}/exe", r.pid)).ok(),
                    rule: r.rule_id,
                    pid: r.pid,
                    tid: r.tid,
                    comm: r.comm,
                    cgroup_id: r.cgroup_id,
                    local: r.local.to_string(),
                    peer: r.peer.to_string(),
                    plaintext_bytes: r.plain_len,
                    refused_bytes: r.refused_bytes,
                    bytes_sent: 0,
                    connection_killed: r.killed,
                };
                let _ = out.send(Output::Record(Record::GateRefused(record)));
            }
        }
    })?)
}

/// Heartbeat, and refused connects to the log and the sinks.
fn forward_denials(enforcer: &Enforcer, pipeline: &Pipeline, heartbeat: bool) {
    let denials = enforcer
        .with_guard(|g| {
            if heartbeat && let Err(e) = g.heartbeat() {
                tracing::warn!(error = %format!("{e:#}"), "cannot write the containment heartbeat");
            }
            g.denials()
        })
        .unwrap_or_default();
    for d in denials {
        let dest = std::net::SocketAddr::new(d.addr, d.port);
        let id = block_id(d.block_id);
        let action = match d.action {
            connect::DenialAction::Redirected => "redirect",
            _ => "deny",
        };
        tracing::warn!(block = %id, pid = d.pid, comm = %d.comm, %dest, udp = d.sendmsg, action, "connect refused by a block");
        let record = ConnectDenied {
            time: crate::clock::rfc3339_ms(crate::clock::now_unix_ms()),
            block_id: id,
            pid: d.pid,
            tid: d.tid,
            exe: std::fs::read_link(format!("/proc/{}/exe", d.pid)).ok(),
            comm: d.comm,
            cgroup_id: d.cgroup_id,
            dest: dest.to_string(),
            udp: d.sendmsg,
            action,
            drill: None,
        };
        // Not waited for (this thread keeps containment's heartbeat): a full queue loses the
        // record, counted in records_lost (the refusal itself is in the log above).
        if pipeline.events.try_send(Output::Record(Record::ConnectDenied(record))).is_err() {
            pipeline.counters.records_unqueued.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(pid = d.pid, %dest, "the connect_denied record is lost: the output queue is full (counted in records_lost)");
        }
    }
}

fn report(pipeline: &Pipeline) {
    report_counters(&pipeline.counters, &pipeline.drops.lock().map(|d| *d).unwrap_or_default());
}

fn report_counters(c: &crate::capture::Counters, drops: &[DropCounter; DROP_CAUSES]) {
    let stats = c.worker_stats.lock().map(|s| s.clone()).unwrap_or_default();
    let sum = |f: fn(&crate::capture::conn::ConnStats) -> u64| stats.iter().map(f).sum::<u64>();
    tracing::info!(
        events = c.events.load(Ordering::Relaxed),
        records = c.records.load(Ordering::Relaxed),
        joined_both_ends = c.joined.load(Ordering::Relaxed),
        unjoined_client_halves = c.alone_client.load(Ordering::Relaxed),
        unjoined_server_halves = c.alone_server.load(Ordering::Relaxed),
        correlation_overflowed = c.correlation_overflowed.load(Ordering::Relaxed),
        stopped_calls = c.stopped_calls.load(Ordering::Relaxed),
        observed_calls = c.observed_calls.load(Ordering::Relaxed),
        bad_records = c.bad_records.load(Ordering::Relaxed),
        records_pending = c.records_pending.load(Ordering::Relaxed),
        records_lost = c.records_lost.load(Ordering::Relaxed),
        connections = sum(|s| s.connections),
        not_http1_connections = sum(|s| s.not_http1),
        http2_connections = sum(|s| s.http2),
        http2_streams = sum(|s| s.h2.streams),
        http2_streams_over_limit = sum(|s| s.h2.streams_over_limit),
        http2_streams_malformed = sum(|s| s.h2.streams_malformed),
        http2_given_up_gap = sum(|s| s.h2.given_up_gap),
        http2_given_up_hpack = sum(|s| s.h2.given_up_hpack),
        http2_given_up_frames = sum(|s| s.h2.given_up_frames),
        evicted_connections = sum(|s| s.evicted),
        gap_bytes = sum(|s| s.gap_bytes),
        stream_position_resets = sum(|s| s.position_resets),
        parse_errors = sum(|s| s.exchange.parse_errors),
        unparsed_bytes = sum(|s| s.exchange.skipped_bytes),
        dropped_ring_full_events = drops[0].events,
        dropped_ring_full_bytes = drops[0].bytes,
        dropped_over_call_cap_bytes = drops[1].bytes,
        dropped_read_failed_bytes = drops[2].bytes,
        dropped_args_map_full_calls = drops[3].events,
        "capture stats"
    );
    // What capture loss and oversized heads did to calls (counted when their connections end).
    tracing::info!(
        heads_over_limits = sum(|s| s.exchange.heads_skimmed),
        head_bytes_not_kept = sum(|s| s.exchange.head_bytes_not_kept),
        heads_unparsed = sum(|s| s.exchange.heads_unparsed),
        responses_not_captured = sum(|s| s.exchange.responses_not_captured),
        requests_not_captured = sum(|s| s.exchange.requests_not_captured),
        responses_without_request_skipped = sum(|s| s.exchange.responses_without_request_skipped),
        exchanges_not_captured = sum(|s| s.exchange.exchanges_not_captured),
        pairing_given_up = sum(|s| s.exchange.pairing_given_up),
        responses_unpaired = sum(|s| s.exchange.responses_unpaired),
        turn_mismatches = sum(|s| s.exchange.turn_mismatches),
        "call accounting"
    );
}

/// Start-up checks that turn errors into instructions (what the kernel offers is asked
/// capability by capability, see [`Features`]).
fn preflight() -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "aegis-agent run must run as root: it loads eBPF programs and attaches uprobes. Start \
         it with sudo, or install packaging/aegis-agent.service and use systemctl"
    );
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (harmless on newer ones).
fn raise_memlock() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK");
    }
}
