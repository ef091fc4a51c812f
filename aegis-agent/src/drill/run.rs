//! Running a drill against the live agent: the guard that lifts what the drill set, on
//! every exit path ([`Cleanup`]), and the phases of one scenario ([`Drill::scenario`]).

use std::{
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{
    client::{self, CallOutcome, DrillCgroup},
    endpoint::Endpoint,
    report::{Check, ControlResult, DrillReport, Outcome, Phase, PhaseResult, ScenarioReport},
    scenario::{ClassifiedBy, Control, Reply, Scenario, Validate},
};
use crate::{
    config::Config,
    control::{
        Request,
        blocks::{BlockSpec, BlockTarget, Dest, Expiry, Scope},
        client::call as control_call,
        protocol::Reply as ControlReply,
    },
    evidence::incident::{Store, What},
};

/// How long the drill waits for the agent to record a call, open an incident, deliver a
/// bundle.
const WAIT: Duration = Duration::from_secs(30);
/// Every block a drill sets expires by itself after this, so that even a drill killed
/// with SIGKILL leaves no block for long.
const BLOCK_EXPIRY_SECS: u64 = 15 * 60;

/// Set by SIGINT and SIGTERM while a drill runs.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Have SIGINT and SIGTERM stop the drill between two steps (the guard then lifts
/// everything) rather than kill it where it stands.
pub fn catch_signals() -> anyhow::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("cannot catch {sig}"))?;
    }
    Ok(())
}

fn interrupted() -> anyhow::Result<()> {
    anyhow::ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted (SIGINT or SIGTERM): the drill stopped early");
    Ok(())
}

/// Sleep `d`, waking early when interrupted.
fn pause(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        interrupted()?;
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
    interrupted()
}

/// What the drill has set in the agent and on the host, lifted on drop whatever happened:
/// its blocks, its emergency mode, its mark, its cgroup (and the clients in it).
pub struct Cleanup {
    socket: PathBuf,
    drill: String,
    marked: bool,
    blocks: Vec<String>,
    emergency: Option<String>,
    cgroup: Option<DrillCgroup>,
    /// What could not be lifted, for the report.
    pub left: Vec<String>,
}

impl Cleanup {
    /// Lift the controls set for the current scenario; what failed to lift.
    pub fn lift_controls(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        for id in std::mem::take(&mut self.blocks) {
            match control_call(&self.socket, &Request::Unblock { id: id.clone() }) {
                Ok(_) => {}
                // Lifted already (it expired, or an operator lifted it): nothing is left.
                Err(crate::control::ClientError::Refused(m)) if m.starts_with("no active block") => {}
                Err(e) => failed.push(format!("block {id}: {e}")),
            }
        }
        if let Some(cgroup) = self.emergency.take() {
            let req = Request::Emergency { on: false, cgroup: Some(cgroup.clone()) };
            if let Err(e) = control_call(&self.socket, &req) {
                failed.push(format!("emergency mode for {cgroup}: {e}"));
            }
        }
        failed
    }

    /// Lift everything; what is left behind.
    pub fn finish(&mut self) -> Vec<String> {
        let mut left = self.lift_controls();
        if self.marked {
            let req = Request::Drill { on: false, id: self.drill.clone(), cgroup: String::new(), policy: None };
            match control_call(&self.socket, &req) {
                Ok(_) => self.marked = false,
                Err(e) => left.push(format!("the agent's drill mark: {e}")),
            }
        }
        if let Some(cgroup) = self.cgroup.take()
            && let Err(e) = cgroup.remove()
        {
            left.push(format!("{e:#}"));
        }
        self.left.extend(left.iter().cloned());
        left
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for l in self.finish() {
            tracing::error!(left = %l, "the drill could not lift this");
        }
    }
}

/// The agent's records file, read from where it ended when the drill started.
struct Records {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// The drill's records seen so far.
    seen: Vec<Value>,
    drill: String,
}

/// Most bytes read from the records file per poll.
const MAX_READ: u64 = 64 << 20;

impl Records {
    fn open(path: &Path, drill: &str) -> Self {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Self { path: path.to_owned(), offset, partial: Vec::new(), seen: Vec::new(), drill: drill.to_owned() }
    }

    fn poll(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else { return };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Rotated: start over in the new file.
            self.offset = 0;
            self.partial.clear();
        }
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        let Ok(n) = f.take(MAX_READ).read_to_end(&mut buf) else { return };
        self.offset += n as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else { return };
        let rest = self.partial.split_off(end + 1);
        for line in self.partial.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            // Only the drill's lines are kept: the cgroup is the drill's, or its block.
            if memchr::memmem::find(line, self.drill.as_bytes()).is_none() {
                continue;
            }
            if let Ok(v) = serde_json::from_slice::<Value>(line) {
                self.seen.push(v);
            }
        }
        self.partial = rest;
    }

    /// Wait for the records of `pid` until `done` says they are enough; what was seen.
    fn wait_pid(&mut self, pid: u32, done: impl Fn(&[&Value]) -> bool) -> anyhow::Result<Vec<Value>> {
        let deadline = Instant::now() + WAIT;
        loop {
            self.poll();
            let mine: Vec<&Value> = self.seen.iter().filter(|r| r["pid"].as_u64() == Some(u64::from(pid))).collect();
            if done(&mine) || Instant::now() >= deadline {
                return Ok(mine.into_iter().cloned().collect());
            }
            pause(Duration::from_millis(25))?;
        }
    }
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check { name: name.into(), outcome: if ok { Outcome::Pass } else { Outcome::Fail }, detail: detail.into() }
}

fn skipped(name: &str, detail: impl Into<String>) -> Check {
    Check { name: name.into(), outcome: Outcome::Skipped, detail: detail.into() }
}

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// Remove the private directories (`$TMPDIR/aegis-drill-*`, this user's) of drills no
/// longer in progress: a drill killed with SIGKILL leaves its own (the agent lifts the rest).
fn remove_stale_work_dirs(mine: &Path, in_progress: &[crate::control::drills::DrillMark]) {
    use std::os::unix::fs::MetadataExt as _;
    let Some(parent) = mine.parent() else { return };
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    // This user: the owner of the directory just made.
    let Ok(uid) = std::fs::metadata(mine).map(|m| m.uid()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix("aegis-") else { continue };
        if !is_drill_id(id) || e.path() == mine || in_progress.iter().any(|d| d.id == id) {
            continue;
        }
        // Not followed: a directory of this user's, holding only what a drill writes there.
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else { continue };
        if !meta.is_dir() || meta.uid() != uid || !holds_only_drill_files(&e.path()) {
            continue;
        }
        match std::fs::remove_dir_all(e.path()) {
            Ok(()) => tracing::info!(dir = %e.path().display(), "removed the directory of a drill that did not end"),
            Err(err) => tracing::warn!(dir = %e.path().display(), error = %err, "a stale drill directory stays"),
        }
    }
}

/// Whether `id` is one [`super::new_id`] makes: `drill-`, 14 digits, `-`, 4 hex digits.
fn is_drill_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("drill-") else { return false };
    let Some((stamp, suffix)) = rest.split_once('-') else { return false };
    stamp.len() == 14
        && stamp.bytes().all(|b| b.is_ascii_digit())
        && suffix.len() == 4
        && suffix.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `dir` holds only regular files a drill writes there (`endpoint.pem`,
/// `request-N.json`, `head-N.txt`), and few of them.
fn holds_only_drill_files(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    let mut n = 0;
    for e in entries {
        let Ok(e) = e else { return false };
        n += 1;
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name == "endpoint.pem"
            || name
                .strip_prefix("request-")
                .and_then(|r| r.strip_suffix(".json"))
                .is_some_and(|d| d.parse::<u32>().is_ok())
            || name
                .strip_prefix("head-")
                .and_then(|r| r.strip_suffix(".txt"))
                .is_some_and(|d| d.parse::<u32>().is_ok());
        if !ours || n > 10_000 || !e.file_type().is_ok_and(|t| t.is_file()) {
            return false;
        }
    }
    true
}

/// A drill in progress: the agent's config, the endpoint, the cgroup and the guard.
pub struct Drill<'a> {
    pub config: &'a Config,
    pub id: String,
    pub endpoint: Endpoint,
    pub work: PathBuf,
    pub cgroup_path: String,
    pub cleanup: Cleanup,
    records: Records,
    seq: u32,
    /// How long each containment is held before the next phase (tests and demos).
    pub hold: Duration,
}

impl<'a> Drill<'a> {
    /// Make the drill's private directory, endpoint and cgroup, and mark the cgroup in the
    /// agent. Nothing is left behind when this fails half-way.
    pub fn start(config: &'a Config, id: &str) -> anyhow::Result<Self> {
        let socket = config.control.socket.clone();
        // The agent first: without it there is nothing to drill.
        control_call(&socket, &Request::Status).context("the drill runs against the running agent")?;
        let work = std::env::temp_dir().join(format!("aegis-{id}"));
        {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&work)
                .with_context(|| format!("cannot make the drill's directory {}", work.display()))?;
        }
        let endpoint = Endpoint::start().inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&work);
        })?;
        std::fs::write(work.join("endpoint.pem"), &endpoint.cert_pem)?;
        let mut cleanup = Cleanup {
            socket: socket.clone(),
            drill: id.to_owned(),
            marked: false,
            blocks: Vec::new(),
            emergency: None,
            cgroup: None,
            left: Vec::new(),
        };
        let made = (|| {
            let root = crate::kernel::cgroup2_root().context("no cgroup v2 mount: a drill needs cgroup v2")?;
            let parent = if config.enforce.enabled { config.enforce.cgroup_dir()? } else { root.clone() };
            let cgroup = DrillCgroup::create(&root, &parent, id)?;
            let path = cgroup.path.clone();
            cleanup.cgroup = Some(cgroup);
            let reply = control_call(
                &socket,
                &Request::Drill { on: true, id: id.to_owned(), cgroup: path.clone(), policy: None },
            )
            .context("the agent refused to mark the drill's cgroup")?;
            cleanup.marked = true;
            if let ControlReply::Drills { drills } = reply {
                remove_stale_work_dirs(&work, &drills);
            }
            anyhow::Ok(path)
        })();
        let cgroup_path = match made {
            Ok(p) => p,
            Err(e) => {
                drop(cleanup);
                let _ = std::fs::remove_dir_all(&work);
                return Err(e);
            }
        };
        let records = Records::open(&config.output.file, id);
        Ok(Self {
            config,
            id: id.to_owned(),
            endpoint,
            work,
            cgroup_path,
            cleanup,
            records,
            seq: 0,
            hold: Duration::ZERO,
        })
    }

    fn call(&mut self, scenario: &Scenario, model: &str, prompt: &str) -> anyhow::Result<CallOutcome> {
        interrupted()?;
        self.seq += 1;
        let cgroup = self.cleanup.cgroup.as_ref().context("the drill cgroup is gone")?;
        let t = &scenario.trigger;
        let spec = client::CallSpec { api: t.api, model, prompt, stream: t.stream };
        client::call(cgroup, &self.work, self.endpoint.primary, spec, self.seq)
    }

    /// Run one scenario through every phase; a phase that fails is reported and the next
    /// ones run where they can.
    pub fn scenario(&mut self, s: &Scenario) -> anyhow::Result<ScenarioReport> {
        let started_at = crate::clock::rfc3339_ms(crate::clock::now_unix_ms());
        let start_ms = crate::clock::now_unix_ms();
        let mut report = ScenarioReport {
            scenario: s.scenario.name.clone(),
            title: s.scenario.title.clone(),
            started_at,
            signal: None,
            severity: None,
            incident: None,
            bundles: Vec::new(),
            controls: Vec::new(),
            phases: Vec::new(),
            passed: false,
        };
        // The scenario's own allowlist for the drill cgroup (or none: the last one's lifted).
        let policy = s.drill_policy();
        let req =
            Request::Drill { on: true, id: self.id.clone(), cgroup: self.cgroup_path.clone(), policy: policy.clone() };
        control_call(&self.config.control.socket, &req).with_context(|| match &policy {
            Some(p) => format!("the agent refused the drill's allowlist {}", p.id),
            None => "the agent refused to renew the drill's mark".into(),
        })?;
        let metrics_before = self.drill_metrics();
        let t0 = Instant::now();

        // Detect: the trigger call, and the agent's first signal about it.
        self.endpoint.set_reply(s.trigger.reply);
        let trigger = self.call(s, &s.trigger.model, &s.trigger.prompt)?;
        let records = self.records.wait_pid(trigger.pid, |r| r.iter().any(|r| r["type"] == "llm_call"))?;
        let detect_ms = ms(t0);
        let record = records.iter().find(|r| r["type"] == "llm_call").cloned();
        let mut checks = Vec::new();
        let mut call_id = None;
        match &record {
            None => checks.push(check(
                "recorded",
                false,
                format!(
                    "the agent recorded no call of the drill client (pid {}) within {} s (client: {}): check capture \
                     with `aegis-agent status` and that output.file is {}",
                    trigger.pid,
                    WAIT.as_secs(),
                    describe(&trigger),
                    self.config.output.file.display()
                ),
            )),
            Some(r) => {
                call_id = r["call_id"].as_str().map(str::to_owned);
                checks.push(check(
                    "marked as a drill",
                    r["drill"].as_str() == Some(self.id.as_str()),
                    format!("record drill = {}", r["drill"]),
                ));
                let (signal, ok) = first_signal(r, &s.expect.category);
                checks.push(check(
                    "first signal",
                    ok,
                    match ok {
                        true => format!("{signal}, {} ms after the trigger call", detect_ms),
                        false => format!(
                            "expected a signal of category {}, the agent's first was {signal}{}",
                            s.expect.category,
                            if s.expect.category == "policy" {
                                " (drift is seen when the scenario's [policy] or a [[policies]] entry of a pack in \
                                 force covers the drill cgroup and does not approve the model)"
                            } else {
                                ""
                            }
                        ),
                    },
                ));
                report.signal = Some(signal);
            }
        }
        report.phases.push(PhaseResult::new(Phase::Detect, detect_ms, detect_ms, checks));

        // Classify: the incident the agent opened (or the drill, as the operator would).
        let t = Instant::now();
        let store = Store::open(&self.config.incidents.dir)?;
        let mut checks = Vec::new();
        let mut incident = None;
        if s.expect.classified_by == ClassifiedBy::Agent {
            let found = self.wait_incident(&store, call_id.as_deref())?;
            match found {
                Some(i) => {
                    checks.push(check(
                        "severity",
                        i.severity == s.expect.severity,
                        format!(
                            "the agent opened {} as {} by rule {} (expected {})",
                            i.id,
                            i.severity.as_str(),
                            i.rule.as_deref().unwrap_or("-"),
                            s.expect.severity.as_str()
                        ),
                    ));
                    checks.push(check(
                        "marked as a drill",
                        i.drill.as_deref() == Some(self.id.as_str()),
                        format!("incident drill = {:?}, title {:?}", i.drill, i.title),
                    ));
                    report.severity = Some(i.severity.as_str().to_owned());
                    incident = Some(i.id);
                }
                None => checks.push(check(
                    "incident opened",
                    false,
                    format!(
                        "the agent opened no incident for the trigger call within {} s: [incidents] auto_open must be on \
                         and an [[incidents.rules]] entry must cover category {}; the drill opens one to go on",
                        WAIT.as_secs(),
                        s.expect.category
                    ),
                )),
            }
        }
        if incident.is_none() {
            let id = store.open_incident(
                &format!("drill {}", self.id),
                What::Open {
                    severity: s.expect.severity,
                    title: format!("[drill {}] {}", self.id, s.scenario.title),
                    owner: None,
                    rule: None,
                    scope: json!({"cgroup": self.cgroup_path}),
                    trigger: json!({"call_id": call_id}),
                    drill: Some(self.id.clone()),
                },
            )?;
            if s.expect.classified_by == ClassifiedBy::Operator {
                checks.push(check(
                    "severity",
                    true,
                    format!(
                        "classified by the drill as the operator would: {id} opened as {}",
                        s.expect.severity.as_str()
                    ),
                ));
                report.severity = Some(s.expect.severity.as_str().to_owned());
            }
            incident = Some(id);
        }
        report.incident = incident.clone();
        report.phases.push(PhaseResult::new(Phase::Classify, ms(t0), ms(t), checks));

        // Contain: the scenario's control, scoped to the drill cgroup, validated by the
        // same call again.
        let t = Instant::now();
        let name = serde_json::to_value(s.contain.control).ok().and_then(|v| v.as_str().map(str::to_owned));
        let mut control = ControlResult { control: name.unwrap_or_default(), ..Default::default() };
        let mut checks = Vec::new();
        let mut contained_pid = None;
        match self.apply(s) {
            Ok((id, detail)) => {
                control.applied = true;
                control.id = id;
                control.detail = detail.clone();
                checks.push(check("applied", true, detail));
                let again = self.call(s, &s.trigger.model, &s.trigger.prompt)?;
                contained_pid = Some(again.pid);
                let (ok, detail) = self.validate(s, &again)?;
                control.validated = ok;
                checks.push(check(
                    match s.contain.validate {
                        Validate::Refused => "next call refused",
                        Validate::Redirected => "next call redirected",
                    },
                    ok,
                    detail,
                ));
            }
            Err(e) => {
                control.detail = format!("{e:#}");
                checks.push(check("applied", false, format!("the agent refused the control: {e:#}")));
            }
        }
        report.phases.push(PhaseResult::new(Phase::Contain, ms(t0), ms(t), checks));
        pause(self.hold)?;

        // Preserve evidence: a snapshot of the drill cgroup, verified, and shipped.
        let t = Instant::now();
        let checks = match &incident {
            Some(id) => self.preserve(&store, id, start_ms, call_id.as_deref(), &mut report.bundles)?,
            None => vec![check("snapshot", false, "no incident to preserve the evidence of")],
        };
        report.phases.push(PhaseResult::new(Phase::Preserve, ms(t0), ms(t), checks));

        // Stabilise: the metrics show the containment, and no drill call as real traffic.
        let t = Instant::now();
        let checks = self.stabilise(s, metrics_before, contained_pid);
        report.phases.push(PhaseResult::new(Phase::Stabilise, ms(t0), ms(t), checks));

        // Recover: controls lifted, the provider back, a call goes through.
        let t = Instant::now();
        let mut checks = Vec::new();
        let failed = self.cleanup.lift_controls();
        control.lifted = failed.is_empty() && control.applied;
        checks.push(check(
            "controls lifted",
            failed.is_empty(),
            if failed.is_empty() { "every control the drill set is lifted".to_owned() } else { failed.join("; ") },
        ));
        match control_call(&self.config.control.socket, &Request::List) {
            Ok(ControlReply::Blocks { blocks, emergency, .. }) => {
                let ours: Vec<&str> =
                    blocks.iter().filter(|b| b.spec.reason.contains(&self.id)).map(|b| b.id.as_str()).collect();
                let still_emergency = emergency.cgroups.iter().any(|c| c == &self.cgroup_path);
                checks.push(check(
                    "agent state",
                    ours.is_empty() && !still_emergency,
                    format!("drill blocks in force: {ours:?}; emergency mode for the drill cgroup: {still_emergency}"),
                ));
            }
            Ok(_) => checks.push(check("agent state", false, "unexpected answer to list")),
            Err(e) => checks.push(check("agent state", false, format!("{e}"))),
        }
        self.endpoint.set_reply(Reply::Ok);
        let after = self.call(s, s.recover_model(), &s.recover.prompt)?;
        let recs = self.records.wait_pid(after.pid, |r| r.iter().any(|r| r["type"] == "llm_call"))?;
        let stopped = recs.iter().any(|r| r["enforcement"]["outcome"] == "connection_killed");
        checks.push(check(
            "traffic restored",
            after.succeeded() && after.served_by.as_deref() == Some("primary") && !stopped,
            format!("recovery call: {}", describe(&after)),
        ));
        report.controls.push(control);
        report.phases.push(PhaseResult::new(Phase::Recover, ms(t0), ms(t), checks));
        if let Some(id) = &incident {
            store.record(
                &format!("drill {}", self.id),
                id,
                What::Resolve { text: Some(format!("drill {} scenario {} ended", self.id, s.scenario.name)) },
            )?;
        }
        report.passed = report.phases.iter().all(|p| p.outcome != Outcome::Fail);
        Ok(report)
    }

    /// The incident the agent opened for `call_id` (trigger or later match).
    fn wait_incident(
        &self,
        store: &Store,
        call_id: Option<&str>,
    ) -> anyhow::Result<Option<crate::evidence::incident::Incident>> {
        let Some(call_id) = call_id else { return Ok(None) };
        let deadline = Instant::now() + WAIT;
        loop {
            let found = store.list()?.into_iter().find(|i| {
                i.trigger["call_id"].as_str() == Some(call_id) || i.matched_calls.iter().any(|c| c == call_id)
            });
            if found.is_some() || Instant::now() >= deadline {
                return Ok(found);
            }
            pause(Duration::from_millis(50))?;
        }
    }

    /// Apply the scenario's control; (block id or "emergency", what was applied).
    fn apply(&mut self, s: &Scenario) -> anyhow::Result<(String, String)> {
        let socket = self.config.control.socket.clone();
        let reason = format!("{} scenario {}", self.id, s.scenario.name);
        let scope = Scope::Cgroup(self.cgroup_path.clone());
        let primary = self.endpoint.primary;
        let (target, scope, fallback) = match s.contain.control {
            Control::Emergency => {
                let req = Request::Emergency { on: true, cgroup: Some(self.cgroup_path.clone()) };
                self.cleanup.emergency = Some(self.cgroup_path.clone());
                control_call(&socket, &req)?;
                return Ok(("emergency".into(), format!("emergency mode on for {}", self.cgroup_path)));
            }
            Control::DisableModel => (BlockTarget::Model(s.trigger.model.clone()), scope, None),
            Control::DisableRoute => (
                BlockTarget::Route { host: primary.to_string(), path_prefix: s.trigger.api.path().into() },
                scope,
                None,
            ),
            Control::DisableTenant => (BlockTarget::Tenant(self.cgroup_path.clone()), Scope::Host, None),
            Control::Fallback => (
                BlockTarget::Dest(Dest { net: primary.ip(), prefix: 32, port: Some(primary.port()) }),
                scope,
                Some(self.endpoint.fallback),
            ),
        };
        let spec = BlockSpec { target, scope, expires: Some(Expiry::AfterSecs(BLOCK_EXPIRY_SECS)), fallback, reason };
        match control_call(&socket, &Request::Block(spec))? {
            ControlReply::Blocked { block, report } => {
                self.cleanup.blocks.push(block.id.clone());
                let fallback = block.spec.fallback.map(|f| format!(" -> fallback {f}")).unwrap_or_default();
                Ok((block.id.clone(), format!("{} ({}){fallback}: {report}", block.spec.target, block.spec.scope)))
            }
            other => anyhow::bail!("unexpected answer to block: {other:?}"),
        }
    }

    /// Whether the call after containment was refused or redirected, as the scenario asks.
    fn validate(&mut self, s: &Scenario, again: &CallOutcome) -> anyhow::Result<(bool, String)> {
        match s.contain.validate {
            Validate::Redirected => {
                let recs = self.records.wait_pid(again.pid, |r| r.iter().any(|r| r["type"] == "connect_denied"))?;
                let redirected = recs.iter().any(|r| r["type"] == "connect_denied" && r["action"] == "redirect");
                let ok = again.succeeded() && again.served_by.as_deref() == Some("fallback");
                Ok((ok && redirected, format!("{}; the agent recorded the redirect: {redirected}", describe(again))))
            }
            Validate::Refused => {
                let recs = self.records.wait_pid(again.pid, |r| {
                    r.iter()
                        .any(|r| r["type"] == "connect_denied" || r["enforcement"]["outcome"] == "connection_killed")
                })?;
                let by = recs.iter().find_map(|r| {
                    if r["type"] == "connect_denied" {
                        Some(format!("connect refused by {}", r["block_id"].as_str().unwrap_or("?")))
                    } else if r["enforcement"]["outcome"] == "connection_killed" {
                        Some(format!(
                            "connection destroyed by {} ({} us after the verdict)",
                            r["enforcement"]["by"].as_str().unwrap_or("?"),
                            r["enforcement"]["verdict_to_kill_us"]
                        ))
                    } else {
                        None
                    }
                });
                // Not stopped: say what the agent did instead (observed, a kill that failed).
                let instead = recs.iter().find_map(|r| {
                    let e = &r["enforcement"];
                    e.is_object().then(|| {
                        format!(
                            "{} by {}: {}",
                            e["outcome"].as_str().unwrap_or("?"),
                            e["by"].as_str().unwrap_or("?"),
                            e["detail"].as_str().unwrap_or("")
                        )
                    })
                });
                let ok = !again.succeeded() && by.is_some();
                let by = by.or(instead);
                Ok((
                    ok,
                    format!("{}; the agent: {}", describe(again), by.as_deref().unwrap_or("no record of stopping it")),
                ))
            }
        }
    }

    fn preserve(
        &self,
        store: &Store,
        incident: &str,
        start_ms: u64,
        call_id: Option<&str>,
        bundles: &mut Vec<String>,
    ) -> anyhow::Result<Vec<Check>> {
        use crate::evidence::bundle::{Selector, SnapshotRequest, snapshot};
        let config = self.config;
        let mut checks = Vec::new();
        let inc = store.get(incident)?;
        // The agent's own bundle (SEV-1 and SEV-2 incidents it opened).
        for b in &inc.bundles {
            if let Some(d) = b["digest"].as_str() {
                bundles.push(d.to_owned());
            }
        }
        if let Err(e) = control_call(&config.control.socket, &Request::Checkpoint) {
            checks.push(check("checkpoint", false, format!("no checkpoint of the decision log: {e}")));
        }
        let req = SnapshotRequest {
            selector: Selector { cgroup: Some(self.cgroup_path.clone()), ..Default::default() },
            since_ms: start_ms.saturating_sub(1000),
            until_ms: crate::clock::now_unix_ms(),
            incident: Some((inc.id.clone(), inc.severity)),
            incident_start_ms: Some(start_ms),
            payloads: config.lookback.payloads,
            harmful: call_id.map(str::to_owned).into_iter().collect(),
            incident_record: crate::evidence::incident::summary(&inc),
        };
        let written = match snapshot(config, &req, &config.incidents.bundles_dir) {
            Ok((w, _)) => w,
            Err(e) => {
                checks.push(check("snapshot", false, format!("{e:#}")));
                return Ok(checks);
            }
        };
        bundles.push(written.digest.clone());
        checks.push(check(
            "snapshot",
            written.calls >= 1,
            format!("{} ({} calls, {} proofs)", written.path.display(), written.calls, written.proofs),
        ));
        let verified = (|| {
            let key = crate::evidence::key::HostKey::load(&config.evidence.key, &config.evidence.key_name()?)?;
            let envelope = crate::evidence::dsse::read_envelope(&written.path)?;
            crate::evidence::dsse::verify(&envelope, &key.verifier()).map_err(|e| anyhow::anyhow!("{e}"))?;
            anyhow::Ok(())
        })();
        checks.push(match verified {
            Ok(()) => check("verifies", true, "signature checked with the host key"),
            Err(e) => check("verifies", false, format!("{e:#}")),
        });
        if !config.collector.enabled() {
            checks.push(skipped(
                "reaches the collector",
                "no [collector] is configured on this host: the bundle stays local",
            ));
        } else {
            let delivered = (|| {
                crate::evidence::incident::ship(config, &written.path)?;
                let spool = config.collector.spool()?;
                let deadline = Instant::now() + WAIT;
                loop {
                    if !spool.pending()?.iter().any(|(d, _)| d == &written.digest) {
                        return anyhow::Ok(true);
                    }
                    if Instant::now() >= deadline {
                        return Ok(false);
                    }
                    pause(Duration::from_millis(100))?;
                }
            })();
            checks.push(match delivered {
                Ok(true) => check("reaches the collector", true, "delivered (it left the spool)"),
                Ok(false) => check(
                    "reaches the collector",
                    false,
                    format!(
                        "still in the spool after {} s: is [collector] url reachable and this agent enrolled?",
                        WAIT.as_secs()
                    ),
                ),
                Err(e) => check("reaches the collector", false, format!("{e:#}")),
            });
        }
        store.record(
            &format!("drill {}", self.id),
            incident,
            What::Bundle {
                path: written.path.display().to_string(),
                digest: written.digest,
                shipped: config.collector.enabled(),
            },
        )?;
        Ok(checks)
    }

    /// The drill's counters from `/metrics` (None: no metrics listener).
    fn drill_metrics(&self) -> Option<anyhow::Result<Metrics>> {
        let listen = &self.config.metrics.listen;
        (!listen.is_empty()).then(|| scrape(listen, &self.cgroup_path))
    }

    fn stabilise(&self, s: &Scenario, before: Option<anyhow::Result<Metrics>>, contained: Option<u32>) -> Vec<Check> {
        let (Some(before), Some(after)) = (before, self.drill_metrics()) else {
            return vec![self.records_show_the_change(s, contained)];
        };
        let (before, after) = match (before, after) {
            (Ok(b), Ok(a)) => (b, a),
            (Err(e), _) | (_, Err(e)) => return vec![check("metrics show the change", false, format!("{e:#}"))],
        };
        let outcome = match s.contain.validate {
            Validate::Refused => "stopped",
            Validate::Redirected => "connect_redirect",
        };
        let delta =
            after.drill.get(outcome).copied().unwrap_or(0.0) - before.drill.get(outcome).copied().unwrap_or(0.0);
        vec![
            check(
                "metrics show the change",
                delta >= 1.0,
                format!("aegis_drill_calls_total{{outcome=\"{outcome}\"}} rose by {delta}"),
            ),
            check(
                "not counted as real traffic",
                after.real_calls_of_drill == 0.0,
                format!("aegis_llm_calls_total of the drill cgroup: {}", after.real_calls_of_drill),
            ),
        ]
    }
}

impl Drill<'_> {
    /// Without a metrics listener: the agent's records (what its metrics count) show the
    /// contained call stopped or redirected, marked as the drill's (so not counted as real).
    fn records_show_the_change(&self, s: &Scenario, contained: Option<u32>) -> Check {
        const NAME: &str = "records show the change";
        let Some(pid) = contained else {
            return check(NAME, false, "no call was sent under containment");
        };
        let recs: Vec<&Value> =
            self.records.seen.iter().filter(|r| r["pid"].as_u64() == Some(u64::from(pid))).collect();
        let changed = recs.iter().any(|r| match s.contain.validate {
            Validate::Refused => r["type"] == "connect_denied" || r["enforcement"]["outcome"] == "connection_killed",
            Validate::Redirected => r["type"] == "connect_denied" && r["action"] == "redirect",
        });
        let marked = !recs.is_empty() && recs.iter().all(|r| r["drill"].as_str() == Some(self.id.as_str()));
        check(
            NAME,
            changed && marked,
            format!(
                "no [metrics] listen on this host, so the agent's records were read instead: {} records of the \
                 contained call, {}, {}",
                recs.len(),
                if changed { "stopped or redirected" } else { "not stopped or redirected" },
                if marked {
                    "all marked as the drill's (not counted as real traffic)"
                } else {
                    "not all marked as the drill's"
                }
            ),
        )
    }
}

/// What the drill reads from `/metrics`.
#[derive(Debug, Default)]
struct Metrics {
    /// `aegis_drill_calls_total` by outcome.
    drill: std::collections::BTreeMap<String, f64>,
    /// `aegis_llm_calls_total` series of the drill's cgroup (must stay 0).
    real_calls_of_drill: f64,
}

/// GET /metrics from the agent's listener (plain HTTP on the host).
fn scrape(listen: &str, cgroup: &str) -> anyhow::Result<Metrics> {
    let mut stream =
        std::net::TcpStream::connect(listen).with_context(|| format!("cannot reach /metrics at {listen}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {listen}\r\n\r\n")?;
    let mut text = String::new();
    stream.take(32 << 20).read_to_string(&mut text).context("reading /metrics")?;
    let mut m = Metrics::default();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        if let Some(labels) = series.strip_prefix("aegis_drill_calls_total{") {
            if let Some(outcome) = labels.split("outcome=\"").nth(1).and_then(|r| r.split('"').next()) {
                m.drill.insert(outcome.to_owned(), value);
            }
        } else if series.starts_with("aegis_llm_calls_total{") && series.contains(&format!("tenant=\"{cgroup}\"")) {
            m.real_calls_of_drill += value;
        }
    }
    Ok(m)
}

/// The first signal of a record, and whether it is of `category`.
fn first_signal(r: &Value, category: &str) -> (String, bool) {
    let status = r["status"].as_u64().unwrap_or(0);
    if category == "provider_error" || r["decision"]["action"].as_str().is_none_or(|a| a == "allow") {
        if status >= 500 {
            let signal = format!("provider_error: HTTP {status} from {}", r["host"].as_str().unwrap_or("?"));
            return (signal, category == "provider_error");
        }
        if r["decision"]["action"].as_str().is_none_or(|a| a == "allow") {
            return (format!("none (decision allow, HTTP {status})"), false);
        }
    }
    let matches = r["decision"]["matches"].as_array().cloned().unwrap_or_default();
    let first = r["decision"]["rules"][0].as_str().unwrap_or("?");
    let first_category =
        matches.iter().find(|m| m["rule"].as_str() == Some(first)).and_then(|m| m["category"].as_str()).unwrap_or("?");
    let ok = matches.iter().any(|m| m["category"].as_str() == Some(category));
    (format!("rule:{first} ({first_category}, {})", r["decision"]["action"].as_str().unwrap_or("?")), ok)
}

fn describe(c: &CallOutcome) -> String {
    let mut s = match (c.exit, c.status) {
        (Some(0), Some(st)) => format!("HTTP {st}"),
        (Some(code), Some(st)) => format!("curl exit {code} after HTTP {st}"),
        (Some(code), None) => format!("curl exit {code}, no response"),
        (None, _) => "curl killed by a signal".into(),
    };
    if let Some(by) = &c.served_by {
        s += &format!(" from the {by} endpoint");
    }
    if !c.error.is_empty() && !c.succeeded() {
        s += &format!(" ({})", c.error);
    }
    s += &format!(" in {} ms", c.took_ms);
    s
}

/// Run `scenarios` as drill `id`; the report, with what was left behind. The guard lifts
/// everything on every path, an error or an interruption included.
pub fn run(config: &Config, id: &str, scenarios: &[Scenario], hold: Duration) -> anyhow::Result<DrillReport> {
    let started = Instant::now();
    let started_at = crate::clock::rfc3339_ms(crate::clock::now_unix_ms());
    let mut drill = Drill::start(config, id)?;
    drill.hold = hold;
    let mut reports = Vec::new();
    let mut stopped = None;
    for s in scenarios {
        tracing::info!(drill = id, scenario = %s.scenario.name, "scenario");
        match drill.scenario(s) {
            Ok(r) => reports.push(r),
            Err(e) => {
                stopped = Some(format!("scenario {}: {e:#}", s.scenario.name));
                break;
            }
        }
    }
    let cgroup = drill.cgroup_path.clone();
    let mut left = drill.cleanup.finish();
    let work = drill.work.clone();
    drop(drill);
    if let Err(e) = std::fs::remove_dir_all(&work) {
        left.push(format!("the drill's directory {}: {e}", work.display()));
    }
    let passed = stopped.is_none() && left.is_empty() && reports.iter().all(|r| r.passed);
    Ok(DrillReport {
        drill: id.to_owned(),
        host: crate::evidence::key::host_name().unwrap_or_default(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        started_at,
        took_ms: ms(started),
        cgroup,
        scenarios: reports,
        left_behind: left,
        passed,
        stopped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_killed_drills_own_directory_is_removed() {
        assert!(is_drill_id(&crate::drill::new_id()));
        assert!(!is_drill_id("drill-collector-AOu33n") && !is_drill_id("drill-2026120617593-abfa"));
        let tmp = std::env::temp_dir().join(format!("aegis-drill-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let mine = tmp.join("aegis-drill-20261206175934-aaaa");
        let stale = tmp.join("aegis-drill-20261206175934-bbbb");
        let running = tmp.join("aegis-drill-20261206175934-cccc");
        let foreign = tmp.join("aegis-drill-20261206175934-dddd");
        let other = tmp.join("aegis-drill-collector-x");
        for d in [&mine, &stale, &running, &foreign, &other] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("endpoint.pem"), "x").unwrap();
        }
        std::fs::write(stale.join("request-1.json"), "{}").unwrap();
        std::fs::write(stale.join("head-1.txt"), "").unwrap();
        std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
        let in_progress = [crate::control::drills::DrillMark {
            id: "drill-20261206175934-cccc".into(),
            cgroup: "/x".into(),
            blocks: vec![],
            pid: 0,
            pid_start: 0,
            policy: None,
        }];
        remove_stale_work_dirs(&mine, &in_progress);
        assert!(!stale.exists(), "a killed drill's directory is removed");
        for d in [&mine, &running, &foreign, &other] {
            assert!(d.exists(), "{} is kept", d.display());
        }
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
