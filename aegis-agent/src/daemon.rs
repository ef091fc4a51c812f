//! `aegis-agent run`: capture, rules, containment and the control socket, together.

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
    capture::{Output, Pipeline, probes::TlsProbes, process::cgroup2_root, targets},
    config::{Config, FailMode},
    control::{ControlServer, ServerHandle},
    enforce::{
        connect::{self, ConnectGuard},
        gate::{Gate, GateConfig},
        handler::{Enforcer, SocketIndex, block_id},
        providers::ProviderBook,
        verdict::{ConnectionKiller, Containment, HostBook},
    },
    policy::{Inspector, redact::Redactor, reload},
    rules,
    sinks::JsonLines,
};

/// Containment parts that live as long as the daemon.
struct Enforcement {
    /// Held for the agent's life: one agent per control socket and pin directory.
    _lock: std::fs::File,
    /// The cgroup v2 directory containment is attached to, and its name as
    /// /proc/PID/cgroup shows it ("/" for the whole host).
    cgroup: std::path::PathBuf,
    scope: String,
    enforcer: Arc<Enforcer>,
    server: ServerHandle,
    fail: FailMode,
}

pub fn run(config: &Config, ready_file: Option<&Path>) -> anyhow::Result<()> {
    preflight()?;
    raise_memlock();
    let lock = if config.enforce.enabled { Some(lock_instance(config)?) } else { None };

    let capture = &config.capture;
    let mut discovery = targets::Discovery::default();
    let found = discovery.scan(&capture.libraries, &capture.executables, capture.discover);
    anyhow::ensure!(
        !found.is_empty(),
        "no OpenSSL library found to probe (looked for libssl.so.3 and libssl.so.1.1 in the \
         system library directories and in running processes): install libssl3, or list the \
         library under capture.libraries in the config"
    );
    let inspector = if config.rules.enabled {
        let (engine, policies) = rules::load(&config.rules.packs).context("the configured rulepacks are invalid")?;
        let redactor = Redactor::load_or_create(&config.rules.evidence_key)?;
        for p in engine.packs() {
            tracing::info!(pack = %p.name, version = %p.version, digest = %p.digest, "rulepack in force");
        }
        Some(Arc::new(Inspector::with_policies(engine, policies, redactor)))
    } else {
        None
    };
    let (mut probes, source) = TlsProbes::load(capture.ring_buffer_bytes)?;
    anyhow::ensure!(
        probes.attach(&found) > 0,
        "no TLS library could be probed (see the warnings above): check that the kernel \
         allows uprobes (CONFIG_UPROBE_EVENTS) and that the files are readable"
    );

    let providers = Arc::new(
        ProviderBook::new(&config.providers, config.enforce.resolve.clone())
            .map_err(|e| anyhow::anyhow!("invalid [providers] configuration: {e}"))?,
    );
    let enforcement = match lock {
        Some(lock) => Some(start_enforcement(config, &providers, lock)?),
        None => None,
    };
    let containment = match &enforcement {
        Some(e) => Containment {
            view: Some(e.server.view()),
            killer: Some(e.enforcer.clone() as Arc<dyn ConnectionKiller>),
            hosts: Some(e.enforcer.clone() as Arc<dyn HostBook>),
            scope: Some(e.scope.clone()),
        },
        None => Containment::default(),
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

    let gate = match (&enforcement, &inspector) {
        (Some(e), Some(i)) if config.enforce.gate.enabled => Some(start_gate(config, &mut probes, e, i)?),
        _ => None,
    };

    let sink = JsonLines::open(config.output.stdout, &config.output.file)?;
    let pipeline = Pipeline::start(config, probes, discovery, source, sink, inspector.clone(), containment)?;
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
        )?),
        _ => None,
    };
    tracing::info!(
        targets = found.len(),
        workers = config.workers(),
        file = %config.output.file.display(),
        enforcement = enforcement.is_some(),
        "capture ready"
    );
    if let Some(path) = ready_file {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write the ready file {}", path.display()))?;
    }

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let interval = config.output.stats_interval_secs;
    runtime.block_on(async {
        // Both streams are made once: a signal arriving between two turns of the loop is
        // kept for the next turn (a fresh `ctrl_c()` future per turn would miss it).
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut ticker = tokio::time::interval(Duration::from_secs(interval.max(1)));
        ticker.tick().await;
        let mut enforce_tick = tokio::time::interval(Duration::from_millis(100));
        let mut beats = 0u32;
        loop {
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => break,
                _ = ticker.tick(), if interval > 0 => report(&pipeline),
                _ = enforce_tick.tick(), if enforcement.is_some() => {
                    let e = enforcement.as_ref().expect("checked");
                    beats += 1;
                    forward_denials(&e.enforcer, &pipeline, beats % 10 == 0);
                }
            }
        }
        anyhow::Ok(())
    })?;
    tracing::info!("stopping: finishing open calls and detaching probes");
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
    let final_drops = pipeline.stop();
    *drops_handle.lock().unwrap_or_else(|e| e.into_inner()) = final_drops;
    report_counters(&counters, &final_drops);
    if let Some(e) = enforcement {
        stop_enforcement(e);
    }
    tracing::info!("stopped; all probes detached");
    Ok(())
}

fn start_enforcement(
    config: &Config,
    providers: &Arc<ProviderBook>,
    lock: std::fs::File,
) -> anyhow::Result<Enforcement> {
    let cgroup = config.enforce.cgroup_dir()?;
    let root = cgroup2_root().context("no cgroup v2 mount found")?;
    let fail = match config.enforce.fail {
        FailMode::Closed => connect::FailMode::Closed,
        FailMode::Open => connect::FailMode::Open { grace: Duration::from_secs(config.enforce.grace_secs.max(1)) },
    };
    let (guard, adopted) = ConnectGuard::open(&cgroup, &config.enforce.pin_dir, fail).with_context(|| {
        format!(
            "cannot load the containment programs onto cgroup {} (pins in {}): check that bpffs is mounted \
             at /sys/fs/bpf, or set enforce.enabled = false to run without containment",
            cgroup.display(),
            config.enforce.pin_dir.display()
        )
    })?;
    tracing::info!(cgroup = %cgroup.display(), pins = %config.enforce.pin_dir.display(), adopted = ?adopted, "containment programs in force");
    let enforcer = Arc::new(Enforcer::new(Some(guard), providers.clone(), root.clone()));
    // Restores the saved blocks and makes the (maybe adopted) kernel rules equal to them.
    let server = ControlServer::start(config.control.clone(), config.enforce.mode, enforcer.clone())
        .context("cannot start the control socket")?;
    tracing::info!(socket = %server.socket().display(), "control socket ready");
    let scope = crate::enforce::handler::cgroup_name(&root, &cgroup).unwrap_or_else(|| "/".into());
    Ok(Enforcement { _lock: lock, cgroup, scope, enforcer, server, fail: config.enforce.fail })
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

fn stop_enforcement(e: Enforcement) {
    let nothing_blocked = e.server.view().blocks().is_empty();
    e.server.shutdown();
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

/// Attach the content gate to the enforcement cgroup with the packs' kernel keywords; it
/// also indexes which socket carries each TLS connection, so a stopped call's connection is
/// found exactly.
fn start_gate(
    config: &Config,
    probes: &mut TlsProbes,
    e: &Enforcement,
    inspector: &Inspector,
) -> anyhow::Result<Arc<RwLock<Gate>>> {
    let mut gc = GateConfig::new(e.cgroup.clone());
    gc.ports = config.enforce.gate.ports.clone();
    gc.kill = true;
    let mut gate = Gate::attach(probes.ebpf_mut(), &gc).context("cannot attach the content gate (enforce.gate)")?;
    let keywords = inspector.engine().kernel_keywords();
    gate.set_keywords(&keywords).context("cannot load the kernel keywords into the content gate")?;
    tracing::info!(keywords = keywords.len(), ports = ?gc.ports, "content gate attached");
    let gate = Arc::new(RwLock::new(gate));
    e.enforcer.set_socket_index(Arc::new(GateIndex(gate.clone())));
    Ok(gate)
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
                let record = serde_json::json!({
                    "type": "gate_refused",
                    "time": crate::control::blocks::rfc3339_ms(crate::control::blocks::now_unix_ms()),
                    "rule": r.rule_id,
                    "pid": r.pid,
                    "tid": r.tid,
                    "comm": r.comm,
                    "cgroup_id": r.cgroup_id,
                    "exe": std::fs::read_link(format!("/proc/{}/exe", r.pid)).ok(),
                    "local": r.local.to_string(),
                    "peer": r.peer.to_string(),
                    "plaintext_bytes": r.plain_len,
                    "refused_bytes": r.refused_bytes,
                    "bytes_sent": 0,
                    "connection_killed": r.killed,
                });
                let _ = out.send(Output::Event(record));
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
        let record = serde_json::json!({
            "type": "connect_denied",
            "time": crate::control::blocks::rfc3339_ms(crate::control::blocks::now_unix_ms()),
            "block_id": id,
            "pid": d.pid,
            "tid": d.tid,
            "comm": d.comm,
            "cgroup_id": d.cgroup_id,
            "exe": std::fs::read_link(format!("/proc/{}/exe", d.pid)).ok(),
            "dest": dest.to_string(),
            "udp": d.sendmsg,
            "action": action,
        });
        let _ = pipeline.events.try_send(Output::Event(record));
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
        stopped_calls = c.stopped_calls.load(Ordering::Relaxed),
        observed_calls = c.observed_calls.load(Ordering::Relaxed),
        bad_records = c.bad_records.load(Ordering::Relaxed),
        connections = sum(|s| s.connections),
        not_http1_connections = sum(|s| s.not_http1),
        http2_connections = sum(|s| s.http2),
        evicted_connections = sum(|s| s.evicted),
        gap_bytes = sum(|s| s.gap_bytes),
        parse_errors = sum(|s| s.exchange.parse_errors),
        unparsed_bytes = sum(|s| s.exchange.skipped_bytes),
        dropped_ring_full_events = drops[0].events,
        dropped_ring_full_bytes = drops[0].bytes,
        dropped_over_call_cap_bytes = drops[1].bytes,
        dropped_read_failed_bytes = drops[2].bytes,
        dropped_args_map_full_calls = drops[3].events,
        "capture stats"
    );
}

/// Start-up checks that turn kernel errors into instructions.
fn preflight() -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "aegis-agent run must run as root: it loads eBPF programs and attaches uprobes. Start \
         it with sudo, or install packaging/aegis-agent.service and use systemctl"
    );
    anyhow::ensure!(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "this kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing): the agent needs a \
         kernel built with CONFIG_DEBUG_INFO_BTF=y (any mainstream distribution kernel >= 5.15)"
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
