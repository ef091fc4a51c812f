//! The control server inside the daemon: a unix stream socket, one request per
//! connection, and the single place where the block table, the emergency state and the
//! enforcement mode change.
//!
//! Runs on its own thread with its own single-threaded tokio runtime, so it neither
//! depends on nor disturbs the daemon's runtime. Reading and writing the socket is async;
//! everything that may block (the peer's `/proc` entries and user database, the state
//! file, the audit log, the daemon's [`ControlHandler`]) runs on tokio's blocking pool.
//!
//! Order of a change, under one lock (changes are serialised):
//! 1. apply it to a copy of the state; invalid → error, nothing changed;
//! 2. save the copy to the state file (atomically) → error, nothing changed;
//! 3. publish it to the [`ControlView`];
//! 4. call [`ControlHandler::apply`] (kernel maps, killing connections). An error puts
//!    the old state back (view and file) and the operator gets the error: what the table
//!    lists is what the daemon enforces. Expiry is the exception: an expired block leaves
//!    the table even if the handler fails (the failure is logged and audited, and the
//!    kernel side reconciles with the state file).
//! 5. append the audit line (fsync'd), then answer.

use std::{
    io,
    os::{
        fd::{AsRawFd as _, RawFd},
        unix::fs::{MetadataExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, watch},
};

use super::{
    audit::{AuditAction, AuditLog, Outcome},
    blocks::{Actor, Block, BlockSpec, ControlState, Emergency, Scope, Subject, create_private_dir, parse_cgroup},
    group_label,
    mode::{EnforceMode, ModeState},
    protocol::{
        AgentStatus, ApplyReport, CaptureHealth, FleetStatus, PROTOCOL_VERSION, Reply, Request, Response,
        decode_request, encode_response,
    },
};
use crate::{
    clock::{now_unix_ms, rfc3339_ms},
    kernel::capability::Capabilities,
};

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/aegis/control.sock";
/// Default path of the state file (blocks, emergency state, the operator's enforcement mode).
pub const DEFAULT_STATE_FILE: &str = "/var/lib/aegis/blocks.json";
/// Default path of the audit log.
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/aegis/audit.jsonl";

/// Control server settings (a `[control]` table in the agent's TOML; every key optional).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// The unix socket; its directory is created (0750) when missing.
    pub socket: PathBuf,
    /// The group (gid) whose members may use the socket besides root: socket mode 0660
    /// and group owner. None: root only, mode 0600. See [`resolve_group`] for names.
    pub group: Option<u32>,
    pub state_file: PathBuf,
    pub audit_log: PathBuf,
    /// Clients connected at once; more are answered with an error and closed.
    pub max_clients: usize,
    /// Longest request line; longer: an error and the connection closed.
    pub max_request_bytes: usize,
    /// Time for a client to send its whole request (and to take its response).
    pub read_timeout_ms: u64,
    /// How often expiry is checked.
    pub expiry_check_ms: u64,
    /// Active blocks at most (and cgroups in emergency mode at most).
    pub max_blocks: usize,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
            group: None,
            state_file: DEFAULT_STATE_FILE.into(),
            audit_log: DEFAULT_AUDIT_LOG.into(),
            max_clients: 16,
            max_request_bytes: 64 * 1024,
            read_timeout_ms: 5000,
            expiry_check_ms: 1000,
            max_blocks: 4096,
        }
    }
}

/// Largest `control.max_blocks`: that many blocks with the longest reasons and names fit in
/// [`super::blocks::MAX_STATE_FILE_BYTES`].
pub const MAX_BLOCKS: usize = 16384;

impl ControlConfig {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_clients > 0, "control.max_clients must be at least 1");
        anyhow::ensure!(self.max_request_bytes >= 1024, "control.max_request_bytes must be at least 1024");
        anyhow::ensure!(self.read_timeout_ms > 0, "control.read_timeout_ms must be more than 0");
        anyhow::ensure!(self.expiry_check_ms > 0, "control.expiry_check_ms must be more than 0");
        anyhow::ensure!(
            (1..=MAX_BLOCKS).contains(&self.max_blocks),
            "control.max_blocks = {}: must be 1 to {MAX_BLOCKS}, so that the state file stays readable",
            self.max_blocks
        );
        Ok(())
    }

    fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }
}

/// A group name or number to a gid.
pub fn resolve_group(name_or_gid: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = name_or_gid.parse() {
        return Ok(gid);
    }
    nix::unistd::Group::from_name(name_or_gid)
        .with_context(|| format!("cannot look up group {name_or_gid:?}"))?
        .map(|g| g.gid.as_raw())
        .with_context(|| format!("no group named {name_or_gid:?}: create it (groupadd {name_or_gid}) or give a gid"))
}

/// A change the daemon must enforce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// At start: make enforcement equal to exactly this state (kernel maps pinned from a
    /// previous run may hold more or less), in this enforcement mode.
    Restored {
        blocks: Vec<Block>,
        emergency: Emergency,
        mode: EnforceMode,
    },
    Blocked(Block),
    Unblocked(Block),
    Expired(Vec<Block>),
    /// Emergency mode turned `on`/off host-wide (`cgroup` None) or for a cgroup; `state`
    /// is the whole emergency state after the change.
    Emergency {
        on: bool,
        cgroup: Option<String>,
        state: Emergency,
    },
    /// The enforcement mode became `mode` (`aegis-agent enforce on|off`). A handler whose
    /// own enforcement depends on the mode (the in-kernel content gate) follows it here; an
    /// error undoes the switch.
    Mode {
        mode: EnforceMode,
    },
    /// A fleet policy replaced the fleet's blocks (`removed` by `added`, in one step: the
    /// new kernel rules are written before the old ones go) and maybe the host-wide
    /// emergency switch (`emergency` is the whole state after it).
    Fleet {
        version: u64,
        added: Vec<Block>,
        removed: Vec<Block>,
        emergency: Emergency,
        /// The enforcement mode the policy switched to, when it changed.
        mode: Option<EnforceMode>,
    },
}

impl Change {
    /// What an audit line says of the change.
    fn audit_details(&self) -> serde_json::Value {
        match self {
            Change::Blocked(b) | Change::Unblocked(b) => json!({ "block": b }),
            Change::Emergency { on, cgroup, .. } => json!({ "on": on, "cgroup": cgroup }),
            Change::Mode { mode } => json!({ "mode": mode }),
            Change::Expired(blocks) => json!({ "blocks": blocks }),
            Change::Restored { blocks, emergency, mode } => {
                json!({ "blocks": blocks.iter().map(|b| &b.id).collect::<Vec<_>>(), "emergency": emergency, "mode": mode })
            }
            Change::Fleet { version, added, removed, emergency, mode } => json!({
                "fleet_version": version,
                "added": added,
                "removed": removed.iter().map(|b| &b.id).collect::<Vec<_>>(),
                "emergency": emergency,
                "mode": mode,
            }),
        }
    }
}

/// What the daemon does when the control state changes.
pub trait ControlHandler: Send + Sync {
    /// Enforce `change` (update kernel maps, close blocked connections) and say what was
    /// done. Called after the table changed, one change at a time, on a blocking thread;
    /// [`ControlView`] already shows the new state. On `Err` the change is undone (except
    /// [`Change::Expired`] and [`Change::Restored`]), so the handler must leave enforcement
    /// as it was when it fails.
    fn apply(&self, change: &Change) -> Result<ApplyReport, String>;
}

/// A handler that enforces nothing (for tests, or a daemon running without enforcement).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopHandler;

impl ControlHandler for NoopHandler {
    fn apply(&self, _: &Change) -> Result<ApplyReport, String> {
        Ok(ApplyReport::default())
    }
}

/// The handler of an agent whose containment is off in its configuration: the control
/// socket still answers `status` and `blocks`, and every change is refused with the reason.
#[derive(Clone, Copy, Debug, Default)]
pub struct ContainmentOff;

impl ControlHandler for ContainmentOff {
    fn apply(&self, change: &Change) -> Result<ApplyReport, String> {
        match change {
            Change::Restored { blocks, emergency, .. } if blocks.is_empty() && emergency.is_off() => {
                Ok(ApplyReport::default())
            }
            Change::Expired(_) => Ok(ApplyReport::default()),
            Change::Fleet { added, emergency, mode: None, .. } if added.is_empty() && emergency.is_off() => {
                Ok(ApplyReport::default())
            }
            _ => Err("containment is off in this agent's configuration (enforce.enabled = false): set \
                      enforce.enabled = true and restart it to block"
                .into()),
        }
    }
}

/// The current blocks, emergency state and enforcement mode, shared with the daemon's data
/// path (cheap to clone; reads take a read lock, held briefly).
#[derive(Clone, Debug, Default)]
pub struct ControlView {
    state: Arc<RwLock<ControlState>>,
}

impl ControlView {
    /// A view of `state`; the server's own view is the one that follows changes.
    pub(crate) fn new(state: ControlState) -> Self {
        Self { state: Arc::new(RwLock::new(state)) }
    }

    fn read<R>(&self, f: impl FnOnce(&ControlState) -> R) -> R {
        f(&self.state.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn replace(&self, state: ControlState) {
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = state;
    }

    pub fn snapshot(&self) -> ControlState {
        self.read(Clone::clone)
    }

    pub fn blocks(&self) -> Vec<Block> {
        self.read(|s| s.blocks.list().to_vec())
    }

    pub fn emergency(&self) -> Emergency {
        self.read(|s| s.emergency.clone())
    }

    /// Whether a `warn` for a process in `cgroup` becomes a `block`.
    pub fn emergency_applies_to(&self, cgroup: &str) -> bool {
        self.read(|s| s.emergency.applies_to(cgroup))
    }

    /// The enforcement mode in force: whether rule verdicts act (see [`super::mode`]).
    pub fn mode(&self) -> EnforceMode {
        self.read(|s| s.mode.mode)
    }

    /// The enforcement mode and where it comes from (the config or an operator).
    pub fn mode_state(&self) -> ModeState {
        self.read(|s| s.mode.clone())
    }

    /// The oldest active block that stops `subject`.
    pub fn matching_block(&self, subject: &Subject<'_>) -> Option<Block> {
        self.read(|s| s.blocks.matching(subject).cloned())
    }
}

/// The control server; see [`ControlServer::start`].
#[derive(Debug)]
pub struct ControlServer;

/// A running control server: stops (and removes its socket) on [`shutdown`](Self::shutdown)
/// or drop.
#[derive(Debug)]
pub struct ServerHandle {
    core: FleetApplier,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    view: ControlView,
    socket: PathBuf,
    socket_id: (u64, u64),
    capture_health: CaptureHealthSlot,
    audit: Arc<AuditLog>,
}

/// Where `status` asks how capture is doing: the daemon sets it once its pipeline runs
/// (until then, and in agents without capture, `status` reports no capture health).
#[derive(Clone, Default)]
pub struct CaptureHealthSlot(Arc<RwLock<Option<HealthFn>>>);

type HealthFn = Arc<dyn Fn() -> CaptureHealth + Send + Sync>;

impl CaptureHealthSlot {
    pub fn set(&self, health: impl Fn() -> CaptureHealth + Send + Sync + 'static) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(health));
    }

    pub fn clear(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn get(&self) -> Option<CaptureHealth> {
        let health = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        health.map(|h| h())
    }
}

impl std::fmt::Debug for CaptureHealthSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.read().map(|h| h.is_some()).unwrap_or(false) {
            "CaptureHealthSlot(set)"
        } else {
            "CaptureHealthSlot(unset)"
        })
    }
}

/// Puts fleet policies in force through the same steps as an operator's change (audited as
/// pending, saved, published, enforced, undone on failure), and keeps the fleet's state for
/// `status`. Cheap to clone.
#[derive(Clone)]
pub struct FleetApplier(Arc<Core>);

impl std::fmt::Debug for FleetApplier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetApplier")
    }
}

impl FleetApplier {
    /// Replace the fleet's blocks with `specs` (validated, without expiry) and set the
    /// host-wide emergency switch to `emergency` when it is `Some`. The operator's own
    /// blocks stay; a fleet block whose target and scope an operator's block already covers
    /// is not added twice (a note says so).
    pub fn apply(
        &self,
        version: u64,
        specs: &[BlockSpec],
        emergency: Option<bool>,
        mode: Option<EnforceMode>,
        signers: &[String],
    ) -> Result<ApplyReport, String> {
        self.0.apply_fleet(version, specs, emergency, mode, signers)
    }

    /// Publish the fleet's state for `status`.
    pub fn set_status(&self, status: FleetStatus) {
        *self.0.fleet.write().unwrap_or_else(PoisonError::into_inner) = Some(status);
    }

    /// The blocks in force now.
    pub fn view(&self) -> ControlView {
        self.0.view.clone()
    }
}

impl ControlServer {
    /// Bind the socket, load the saved state, resolve the enforcement mode against
    /// `configured` (the config's `enforce.mode`, see [`ModeState::at_start`]), have
    /// `handler` enforce it all ([`Change::Restored`]), and serve. Errors say what to fix: a
    /// path that is not a socket, another agent serving the socket, an unreadable or corrupt
    /// state file.
    pub fn start(
        config: ControlConfig,
        configured: EnforceMode,
        handler: Arc<dyn ControlHandler>,
    ) -> anyhow::Result<ServerHandle> {
        Self::start_with(config, configured, handler, Capabilities::default(), None)
    }

    /// [`ControlServer::start`], with the daemon's kernel capabilities for `status`, and the
    /// decision log that takes every audit line too.
    pub fn start_with(
        config: ControlConfig,
        configured: EnforceMode,
        handler: Arc<dyn ControlHandler>,
        capabilities: Capabilities,
        ledger: Option<Arc<dyn crate::journal::Ledger>>,
    ) -> anyhow::Result<ServerHandle> {
        config.validate()?;
        // The socket first: a second agent must fail before touching anything. Clients
        // that connect now wait in the backlog until the state is restored.
        let (listener, socket_id) = bind_socket(&config)?;
        let socket = config.socket.clone();
        let remove_socket = |e: anyhow::Error| {
            let _ = std::fs::remove_file(&socket);
            e
        };
        let core = Core::restore(config, configured, handler, capabilities, ledger).map_err(remove_socket)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(4)
            .thread_name("aegis-control")
            .build()
            .context("cannot start the control server runtime")
            .map_err(remove_socket)?;
        let listener = {
            let _enter = runtime.enter();
            listener
                .set_nonblocking(true)
                .and_then(|()| UnixListener::from_std(listener))
                .context("control socket")
                .map_err(remove_socket)?
        };
        let (stop, stop_rx) = watch::channel(false);
        let view = core.view.clone();
        let handle_core = core.clone();
        let capture_health = core.capture_health.clone();
        let audit = core.audit.clone();
        let thread = std::thread::Builder::new()
            .name("aegis-control".into())
            .spawn(move || {
                runtime.block_on(serve(listener, core, stop_rx));
                runtime.shutdown_timeout(Duration::from_secs(5));
            })
            .context("cannot start the control server thread")
            .map_err(remove_socket)?;
        tracing::info!(socket = %socket.display(), "control socket ready");
        Ok(ServerHandle {
            core: FleetApplier(handle_core),
            stop,
            thread: Some(thread),
            view,
            socket,
            socket_id,
            capture_health,
            audit,
        })
    }
}

impl ServerHandle {
    /// The live state, for the data path.
    pub fn view(&self) -> ControlView {
        self.view.clone()
    }

    /// What puts fleet policies in force, for the fleet feed.
    pub fn fleet_applier(&self) -> FleetApplier {
        self.core.clone()
    }

    /// The drills in progress, for the records sink to mark by.
    pub fn drills(&self) -> super::drills::DrillMarks {
        self.core.0.drills.clone()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Where `status` asks how capture is doing.
    pub fn capture_health(&self) -> CaptureHealthSlot {
        self.capture_health.clone()
    }

    /// Reopen the audit log at its path (SIGHUP, after log rotation); see
    /// [`AuditLog::reopen`].
    pub fn reopen_audit_log(&self) -> anyhow::Result<()> {
        self.audit.reopen()
    }

    /// Stop accepting, let the clients in progress finish (up to the read timeout plus
    /// 10 s), stop the thread and remove the socket.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        self.stop.send_replace(true);
        if thread.join().is_err() {
            tracing::error!("the control server thread panicked");
        }
        // Only our socket: another agent may have replaced it since.
        if let Ok(m) = std::fs::symlink_metadata(&self.socket)
            && (m.dev(), m.ino()) == self.socket_id
        {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

// ---------------------------------------------------------------------------------------
// The socket

/// Create the socket with its final mode and owner before it appears under its name:
/// bound under a temporary name in the same directory, chmod'ed and given to the control
/// group ([`give_to_group`]), then renamed.
fn bind_socket(config: &ControlConfig) -> anyhow::Result<(std::os::unix::net::UnixListener, (u64, u64))> {
    let path = &config.socket;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().with_context(|| format!("control socket path {} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.{}", name.to_string_lossy(), std::process::id()));
    anyhow::ensure!(
        tmp.as_os_str().len() < 108,
        "control socket path {} is too long: a unix socket path has at most 107 bytes, and the agent needs {} \
         more for a temporary name",
        path.display(),
        tmp.as_os_str().len() - path.as_os_str().len()
    );
    if create_private_dir(dir)?
        && let Some(gid) = config.group
    {
        give_to_group(dir, gid)?;
    }
    if let Some(gid) = config.group {
        warn_if_unreachable(dir, gid);
    }
    remove_stale(path)?;
    remove_stale(&tmp)?;
    let listener = std::os::unix::net::UnixListener::bind(&tmp)
        .with_context(|| format!("cannot create the control socket {}", tmp.display()))?;
    let setup = || -> anyhow::Result<(u64, u64)> {
        if let Some(gid) = config.group {
            give_to_group(&tmp, gid)?;
        }
        let mode = if config.group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot create the control socket {}", path.display()))?;
        let m = std::fs::symlink_metadata(path)?;
        Ok((m.dev(), m.ino()))
    };
    match setup() {
        Ok(id) => Ok((listener, id)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Give `path` (created by the agent) to the control group `gid`, without CAP_CHOWN, which
/// the systemd unit does not grant. Nothing to do when it has the group already: it was
/// created by the agent running with `gid` as its group (the unit's `Group=aegis`). Else a
/// `chown` of the group only, which the kernel allows a file's owner for a group the
/// process is a member of (`SupplementaryGroups=`), or with CAP_CHOWN; otherwise the error
/// says how to run the agent.
fn give_to_group(path: &Path, gid: u32) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("cannot check {}", path.display()))?;
    if meta.gid() == gid {
        return Ok(());
    }
    let target = nix::unistd::Gid::from_raw(gid);
    match nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        None,
        Some(target),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EPERM) => anyhow::bail!(
            "cannot give {} to {} ([control] group): without CAP_CHOWN (the systemd unit does not grant it) the agent \
             can only give its files to a group it runs with. Run it with that group: the unit's Group= (Group=aegis \
             with [control] group = the gid of aegis, `getent group aegis`) or SupplementaryGroups=",
            path.display(),
            group_label(gid)
        ),
        Err(e) => Err(e).with_context(|| format!("cannot give {} to {}", path.display(), group_label(gid))),
    }
}

/// Say so when members of `gid` cannot enter `dir`, the socket's directory (e.g. one made by
/// systemd's RuntimeDirectory= without the unit's Group=): the socket's mode alone does not
/// let them in. The agent does not change a directory it did not create.
fn warn_if_unreachable(dir: &Path, gid: u32) {
    let Ok(meta) = std::fs::metadata(dir) else { return };
    let mode = meta.mode();
    if mode & 0o001 != 0 || (meta.gid() == gid && mode & 0o010 != 0) {
        return;
    }
    tracing::warn!(
        dir = %dir.display(),
        mode = format!("{:o}", mode & 0o7777),
        dir_gid = meta.gid(),
        "members of {} cannot reach the control socket: its directory is not searchable by them; give the \
         directory to the group (the systemd unit's RuntimeDirectory is root:aegis 0750 with Group=aegis)",
        group_label(gid)
    );
}

/// Remove a socket left by an agent that is gone; refuse to remove anything else.
fn remove_stale(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot check {}", path.display())),
    };
    anyhow::ensure!(
        meta.file_type().is_socket(),
        "{} exists and is not a socket: refusing to remove it; move it away or configure another control socket path",
        path.display()
    );
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => anyhow::bail!(
            "another process is already serving the control socket {}: is another aegis-agent running? Stop it first",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
            tracing::info!(socket = %path.display(), "removed a stale control socket");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot check whether {} is in use", path.display())),
    }
}

/// Connections still waiting for their request line, oldest first, each with the sender
/// that ends it. Idle clients must not keep an operator out during an incident: when every
/// place is taken, a new client takes the place of the oldest one that has not sent its
/// request yet.
#[derive(Default)]
struct Waiting {
    next: u64,
    conns: std::collections::BTreeMap<u64, tokio::sync::oneshot::Sender<()>>,
}

type WaitingList = Arc<std::sync::Mutex<Waiting>>;

async fn serve(listener: UnixListener, core: Arc<Core>, mut stop: watch::Receiver<bool>) {
    let max = core.config.max_clients;
    let permits = Arc::new(Semaphore::new(max));
    let waiting = WaitingList::default();
    let mut ticker = tokio::time::interval(Duration::from_millis(core.config.expiry_check_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = ticker.tick() => {
                let c = core.clone();
                let reap = move || {
                    c.expire_due(now_unix_ms());
                    c.reap_drills();
                };
                if tokio::task::spawn_blocking(reap).await.is_err() {
                    tracing::error!("the block expiry check panicked");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let permit = match permits.clone().try_acquire_owned() {
                        Ok(permit) => Some(permit),
                        Err(_) => make_room(&permits, &waiting).await,
                    };
                    match permit {
                        Some(permit) => {
                            // Waiting from now until its request is read: the first to go when
                            // every place is taken.
                            let (end, ended) = tokio::sync::oneshot::channel();
                            let id = {
                                let mut w = waiting.lock().unwrap_or_else(PoisonError::into_inner);
                                let id = w.next;
                                w.next += 1;
                                w.conns.insert(id, end);
                                id
                            };
                            let (c, w) = (core.clone(), waiting.clone());
                            tokio::spawn(async move {
                                connection(c, stream, ended).await;
                                w.lock().unwrap_or_else(PoisonError::into_inner).conns.remove(&id);
                                drop(permit);
                            });
                        }
                        None => reject_busy(&core, &stream, max).await,
                    }
                }
                Err(e) => {
                    // Out of descriptors, most likely: let some close.
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let drain = core.config.read_timeout() + Duration::from_secs(10);
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, permits.acquire_many(all)).await.is_err() {
        tracing::warn!("control clients still connected at shutdown; closing them");
    }
}

/// Every place is taken: end the oldest connection still waiting for its request, and take
/// its place once it is gone. None: every client is being served (none is idle).
async fn make_room(permits: &Arc<Semaphore>, waiting: &WaitingList) -> Option<tokio::sync::OwnedSemaphorePermit> {
    loop {
        let (_, end) = waiting.lock().unwrap_or_else(PoisonError::into_inner).conns.pop_first()?;
        // A connection past its read no longer listens: it is being served; try the next.
        if end.send(()).is_ok() {
            break;
        }
    }
    tokio::time::timeout(Duration::from_secs(1), permits.clone().acquire_owned()).await.ok()?.ok()
}

/// Every place is taken by a client being served: say so, and audit it (a flood of clients
/// that keeps an operator out is worth knowing about).
async fn reject_busy(core: &Arc<Core>, stream: &UnixStream, max: usize) {
    let message = format!("the agent is busy: {max} control clients are being served; try again in a few seconds");
    tracing::warn!("{message}");
    let mut line = encode_response(&Response::error(message.clone()));
    line.push('\n');
    // A fresh socket's buffer is empty: this small write does not block nor fail.
    let _ = stream.try_write(line.as_bytes());
    let actor = peer_actor(stream);
    let c = core.clone();
    let _ = tokio::task::spawn_blocking(move || {
        c.audit(&actor, AuditAction::Connect, json!({ "max_clients": max }), Outcome::Refused, Some(message))
    })
    .await;
}

/// Who is at the other end of `stream`, as far as the kernel says.
fn peer_actor(stream: &UnixStream) -> Actor {
    match stream.peer_cred() {
        Ok(cred) => {
            Actor::of_process(cred.uid(), cred.gid(), cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0))
        }
        Err(_) => Actor { uid: u32::MAX, gid: u32::MAX, pid: 0, comm: String::new(), user: None },
    }
}

enum ReadError {
    TooLong,
    TimedOut,
    Io(io::Error),
}

/// One request line within `timeout`, at most `max` bytes. `None`: the client closed
/// without sending anything. A last line without its newline counts.
async fn read_request(stream: &mut UnixStream, max: usize, timeout: Duration) -> Result<Option<Vec<u8>>, ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut reader = BufReader::new(stream).take(max as u64 + 1);
    match tokio::time::timeout(timeout, reader.read_until(b'\n', &mut buf)).await {
        Err(_) => return Err(ReadError::TimedOut),
        Ok(Err(e)) => return Err(ReadError::Io(e)),
        Ok(Ok(_)) => {}
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Some(buf));
    }
    if buf.len() > max {
        return Err(ReadError::TooLong);
    }
    Ok((!buf.is_empty()).then_some(buf))
}

async fn send(stream: &mut UnixStream, response: &Response, timeout: Duration) {
    let mut line = encode_response(response);
    line.push('\n');
    let write = async {
        stream.write_all(line.as_bytes()).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "control client left before its response"),
        Err(_) => tracing::debug!("control client did not take its response"),
    }
}

/// One client: authorise it, read its request unless `ended` says its place is needed by
/// another client first, handle it, answer.
async fn connection(core: Arc<Core>, mut stream: UnixStream, ended: tokio::sync::oneshot::Receiver<()>) {
    let timeout = core.config.read_timeout();
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the control client's credentials");
            return;
        }
    };
    let groups = peer_groups(stream.as_raw_fd());
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
    let (uid, gid) = (cred.uid(), cred.gid());
    let c = core.clone();
    let actor = match tokio::task::spawn_blocking(move || c.authorize(uid, gid, pid, groups)).await {
        Ok(Ok(actor)) => actor,
        Ok(Err(message)) => return send(&mut stream, &Response::error(message), timeout).await,
        Err(_) => return,
    };
    let max = core.config.max_request_bytes;
    let read = tokio::select! {
        read = read_request(&mut stream, max, timeout) => Some(read),
        Ok(()) = ended => None,
    };
    let Some(read) = read else {
        let message = "closed: every control place was taken and a client needed this one; this connection had sent \
                       no request yet";
        tracing::warn!(%actor, "idle control client closed to make room");
        let (c, a, m) = (core.clone(), actor.clone(), message.to_owned());
        let _ = tokio::task::spawn_blocking(move || {
            c.audit(&a, AuditAction::Connect, json!({ "idle": true }), Outcome::Refused, Some(m))
        })
        .await;
        return send(&mut stream, &Response::error(message), timeout).await;
    };
    let response = match read {
        Ok(Some(line)) => {
            let c = core.clone();
            tokio::task::spawn_blocking(move || c.handle_line(&actor, &line)).await.unwrap_or_else(|_| {
                Response::error("internal error: the request handler panicked; see the agent's log")
            })
        }
        Ok(None) => return,
        Err(ReadError::TooLong) => {
            let message = format!("request too long: more than {max} bytes without a newline; closing the connection");
            let (c, m) = (core.clone(), message.clone());
            let _ = tokio::task::spawn_blocking(move || {
                c.audit(&actor, AuditAction::Request, json!({ "max_bytes": max }), Outcome::Refused, Some(m))
            })
            .await;
            Response::error(message)
        }
        Err(ReadError::TimedOut) => Response::error(format!(
            "no complete request within {} ms: send one JSON object followed by a newline",
            core.config.read_timeout_ms
        )),
        Err(ReadError::Io(e)) => {
            tracing::debug!(error = %e, "control client read failed");
            return;
        }
    };
    send(&mut stream, &response, timeout).await;
}

// ---------------------------------------------------------------------------------------
// Peer credentials

/// The peer's supplementary groups as of `connect` (`SO_PEERGROUPS`, Linux 4.13+): no
/// race with the client exiting and its pid being reused, unlike `/proc/PID/status`.
fn peer_groups(fd: RawFd) -> io::Result<Vec<u32>> {
    let size = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * size).map_err(io::Error::other)?;
        // SAFETY: `groups` is valid for writes of `len` bytes, and `fd` is the open socket
        // the caller holds for the whole call.
        let rc = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len)
        };
        let needed = len as usize / size;
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= 65_536 {
            groups.resize(needed, 0);
            continue;
        }
        return Err(err);
    }
}

/// The supplementary groups of `pid` from `/proc/PID/status`, for kernels without
/// `SO_PEERGROUPS`; refused when the process there no longer has the peer's uid.
fn proc_groups(pid: u32, uid: u32) -> Result<Vec<u32>, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("permission denied: cannot read the groups of the client process {pid} ({e})"))?;
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| rest.split_whitespace().filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default()
    };
    if field("Uid:").get(1) != Some(&uid) {
        return Err(format!("permission denied: the client process {pid} changed identity while connecting"));
    }
    Ok(field("Groups:"))
}

// ---------------------------------------------------------------------------------------
// The state machine

struct Core {
    config: ControlConfig,
    view: ControlView,
    /// Serialises changes (held across save, enforcement and audit).
    ops: Mutex<()>,
    /// Shared with the [`ServerHandle`], which reopens it on SIGHUP.
    audit: Arc<AuditLog>,
    handler: Arc<dyn ControlHandler>,
    /// This process, the actor of expiry and restore.
    agent: Actor,
    started_at: String,
    /// What each kernel capability came to, for `status`.
    capabilities: Capabilities,
    /// The fleet policy in force, set by the fleet feed (None: no fleet).
    fleet: RwLock<Option<FleetStatus>>,
    /// How capture is doing, for `status`.
    capture_health: CaptureHealthSlot,
    /// The drills in progress, shared with the records sink.
    drills: super::drills::DrillMarks,
}

impl Core {
    /// The audit action of a switch to `mode`.
    fn mode_action(mode: EnforceMode) -> AuditAction {
        match mode {
            EnforceMode::Enforce => AuditAction::EnforceOn,
            EnforceMode::Observe => AuditAction::EnforceOff,
        }
    }

    /// Open the audit log, load the state, drop what expired while the agent was down,
    /// settle the enforcement mode, and have the handler enforce the rest.
    fn restore(
        config: ControlConfig,
        configured: EnforceMode,
        handler: Arc<dyn ControlHandler>,
        capabilities: Capabilities,
        ledger: Option<Arc<dyn crate::journal::Ledger>>,
    ) -> anyhow::Result<Arc<Self>> {
        let audit = Arc::new(AuditLog::open(&config.audit_log)?.with_ledger(ledger));
        let mut state = ControlState::load(&config.state_file)?;
        let expired = state.blocks.expire(now_unix_ms());
        let (mode, replaced) = ModeState::at_start(configured, state.mode.operator.take());
        state.mode = mode;
        if !expired.is_empty() || replaced.is_some() {
            // Like every change, audited as pending before it is saved: a crash between the
            // two leaves a trace, and the result line below follows.
            let agent = Actor::agent();
            for block in &expired {
                audit.record(&agent, AuditAction::Expire, json!({ "block": block }), Outcome::Pending, None)?;
            }
            if replaced.is_some() {
                audit.record(
                    &agent,
                    Self::mode_action(configured),
                    json!({ "mode": &state.mode }),
                    Outcome::Pending,
                    None,
                )?;
            }
            state.save(&config.state_file)?;
        }
        let core = Arc::new(Self {
            view: ControlView::new(state.clone()),
            config,
            ops: Mutex::new(()),
            audit,
            handler,
            agent: Actor::agent(),
            started_at: rfc3339_ms(now_unix_ms()),
            capabilities,
            fleet: RwLock::new(None),
            capture_health: CaptureHealthSlot::default(),
            drills: Default::default(),
        });
        for block in &expired {
            tracing::info!(id = %block.id, target = %block.spec.target, "block expired while the agent was not running");
            core.audit(
                &core.agent,
                AuditAction::Expire,
                json!({ "block": block }),
                Outcome::Ok,
                Some("expired while the agent was not running".into()),
            );
        }
        if let Some(choice) = replaced {
            let message = format!(
                "the config's enforce.mode is now {configured}, not {} as when {} chose {} at {}: the edited config \
                 decides",
                choice.config_mode, choice.set_by, choice.mode, choice.set_at
            );
            tracing::warn!(mode = %configured, "{message}");
            let details = json!({ "replaced": &choice, "mode": &state.mode });
            core.audit(&core.agent, Self::mode_action(configured), details, Outcome::Ok, Some(message));
        }
        tracing::info!(mode = %state.mode, "enforcement mode");
        let (blocks, emergency, mode) = (state.blocks.list().to_vec(), state.emergency, state.mode);
        // The ids: a change whose `pending` line has no result (the agent died in between)
        // is found here when it was saved.
        let ids: Vec<&str> = blocks.iter().map(|b| b.id.as_str()).collect();
        let details = json!({ "blocks": blocks.len(), "ids": ids, "emergency": &emergency, "mode": &mode });
        match core.apply(&Change::Restored { blocks, emergency, mode: mode.mode }) {
            Ok(report) => {
                let mut details = details;
                details["report"] = json!(report);
                core.audit(&core.agent, AuditAction::Restore, details, Outcome::Ok, Some(report.to_string()));
            }
            Err(e) => {
                tracing::error!(error = %e, "the saved blocks could not be enforced");
                core.audit(&core.agent, AuditAction::Restore, details, Outcome::Failed, Some(e));
            }
        }
        core.lift_drills_at_start();
        Ok(core)
    }

    /// Append an audit line; a failure is logged and returned as a warning for the
    /// operator (the change stands: stopping an incident matters more than its record).
    fn audit(
        &self,
        actor: &Actor,
        action: AuditAction,
        details: serde_json::Value,
        result: Outcome,
        message: Option<String>,
    ) -> Option<String> {
        let e = self.audit.record(actor, action, details, result, message).err()?;
        tracing::error!(error = %e, file = %self.audit.path().display(), "cannot write the audit log");
        Some(format!("warning: the audit log {} could not be written: {e}", self.audit.path().display()))
    }

    /// Audit a change that succeeded; the report (and any audit warning) goes back to the
    /// operator.
    fn audit_ok(&self, actor: &Actor, action: AuditAction, mut details: serde_json::Value, report: &mut ApplyReport) {
        details["report"] = json!(report);
        if let Some(warning) = self.audit(actor, action, details, Outcome::Ok, Some(report.to_string())) {
            report.notes.push(warning);
        }
    }

    fn failed(&self, actor: &Actor, action: AuditAction, details: serde_json::Value, message: String) -> Response {
        tracing::warn!(%actor, ?action, %message, "control request failed");
        self.audit(actor, action, details, Outcome::Failed, Some(message.clone()));
        Response::error(message)
    }

    fn authorize(&self, uid: u32, gid: u32, pid: u32, groups: io::Result<Vec<u32>>) -> Result<Actor, String> {
        let actor = Actor::of_process(uid, gid, pid);
        match self.permitted(&actor, groups) {
            Ok(()) => Ok(actor),
            Err(message) => {
                tracing::warn!(%actor, "control client refused");
                self.audit(&actor, AuditAction::Connect, json!({}), Outcome::Refused, Some(message.clone()));
                Err(message)
            }
        }
    }

    /// Root, the agent's own user, or a member (primary or supplementary) of the group.
    fn permitted(&self, actor: &Actor, groups: io::Result<Vec<u32>>) -> Result<(), String> {
        if actor.uid == 0 || actor.uid == self.agent.uid {
            return Ok(());
        }
        let Some(group) = self.config.group else {
            return Err(format!(
                "permission denied: {actor} is not root, and no control group is configured: run as root"
            ));
        };
        if actor.gid == group {
            return Ok(());
        }
        let groups = match groups {
            Ok(groups) => groups,
            Err(e) => {
                tracing::debug!(error = %e, "SO_PEERGROUPS unavailable; reading /proc");
                proc_groups(actor.pid, actor.uid)?
            }
        };
        if groups.contains(&group) {
            return Ok(());
        }
        let label = group_label(group);
        Err(format!(
            "permission denied: {actor} is neither root nor a member of {label}: run as root or as a member of {label}"
        ))
    }

    fn handle_line(&self, actor: &Actor, line: &[u8]) -> Response {
        match decode_request(line) {
            Ok(req) => self.handle(actor, req),
            Err(message) => {
                tracing::warn!(%actor, %message, "control request refused");
                self.audit(
                    actor,
                    AuditAction::Request,
                    json!({ "bytes": line.len() }),
                    Outcome::Refused,
                    Some(message.clone()),
                );
                Response::error(message)
            }
        }
    }

    fn handle(&self, actor: &Actor, req: Request) -> Response {
        match req {
            Request::Block(spec) => self.block(actor, spec),
            Request::Unblock { id } => self.unblock(actor, &id),
            Request::List => self.view.read(|s| {
                Response::Ok(Reply::Blocks {
                    blocks: s.blocks.list().to_vec(),
                    emergency: s.emergency.clone(),
                    mode: Some(s.mode.clone()),
                })
            }),
            Request::Emergency { on, cgroup } => self.emergency(actor, on, cgroup),
            Request::Enforce { on } => {
                self.enforce(actor, if on { EnforceMode::Enforce } else { EnforceMode::Observe })
            }
            Request::Drill { on, id, cgroup, policy } => self.drill(actor, on, &id, &cgroup, policy),
            Request::Checkpoint => match self.audit.checkpoint() {
                Some(size) => Response::Ok(Reply::Checkpoint { size }),
                None => Response::Error {
                    message:
                        "this agent keeps no decision log ([evidence] enabled = false, or it could not be opened: \
                              see the agent's log)"
                            .into(),
                },
            },
            Request::Status => self.view.read(|s| {
                Response::Ok(Reply::Status(AgentStatus {
                    agent_version: env!("CARGO_PKG_VERSION").into(),
                    protocol: PROTOCOL_VERSION,
                    pid: std::process::id(),
                    started_at: self.started_at.clone(),
                    blocks: s.blocks.len(),
                    emergency: s.emergency.clone(),
                    kernel: crate::kernel::kernel_release(),
                    capabilities: self.capabilities.list(),
                    mode: Some(s.mode.clone()),
                    fleet: self.fleet.read().unwrap_or_else(PoisonError::into_inner).clone(),
                    capture: self.capture_health.get().map(Box::new),
                }))
            }),
        }
    }

    /// Run `change` on a copy of the state; save, publish, enforce; undo on failure. The
    /// closure returns the change to enforce (None: nothing changed) and a value.
    ///
    /// The change is audited as `pending` (by `actor`, as `action`) before it is saved, so
    /// that a change never is in force without an audit line, even when the agent dies
    /// half-way (the caller writes the line with the result).
    fn commit<T>(
        &self,
        actor: &Actor,
        action: AuditAction,
        change: impl FnOnce(&mut ControlState, u64) -> Result<(Option<Change>, T), String>,
    ) -> Result<(T, ApplyReport), String> {
        let _ops = self.ops.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.view.snapshot();
        let mut new = old.clone();
        let (change, value) = change(&mut new, now_unix_ms())?;
        let Some(change) = change else {
            return Ok((value, ApplyReport::default()));
        };
        self.audit(actor, action, change.audit_details(), Outcome::Pending, None);
        crate::failpoint::hit("control.commit.after_intent");
        new.save(&self.config.state_file).map_err(|e| format!("nothing changed: {e:#}"))?;
        crate::failpoint::hit("control.commit.after_save");
        self.view.replace(new);
        let applied = self.apply(&change);
        crate::failpoint::hit("control.commit.after_apply");
        match applied {
            Ok(report) => Ok((value, report)),
            Err(e) => {
                self.view.replace(old.clone());
                if let Err(e) = old.save(&self.config.state_file) {
                    tracing::error!(error = %format!("{e:#}"), "cannot restore the state file after a failed change");
                }
                Err(format!("the agent could not enforce the change, so nothing changed: {e}"))
            }
        }
    }

    fn apply(&self, change: &Change) -> Result<ApplyReport, String> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handler.apply(change)))
            .unwrap_or_else(|_| Err("the enforcement handler panicked; see the agent's log".into()))
    }

    fn apply_fleet(
        &self,
        version: u64,
        specs: &[BlockSpec],
        emergency: Option<bool>,
        mode: Option<EnforceMode>,
        signers: &[String],
    ) -> Result<ApplyReport, String> {
        let actor = Actor { comm: format!("fleet v{version}"), ..Actor::agent() };
        let mut notes = Vec::new();
        let result = self.commit(&actor, AuditAction::FleetPolicy, |state, now| {
            let (removed, kept): (Vec<Block>, Vec<Block>) =
                std::mem::take(&mut state.blocks).list().iter().cloned().partition(|b| b.fleet_version.is_some());
            for b in kept {
                state.blocks.add(b)?;
            }
            let mut added = Vec::new();
            for spec in specs {
                let spec = spec.clone().validated()?;
                if let Some(same) = state.blocks.same_as(&spec) {
                    notes.push(format!(
                        "{} ({}) is blocked on this host already by {}",
                        spec.target, spec.scope, same.id
                    ));
                    continue;
                }
                // The id of the block it replaces, when it is the same: ids stay stable
                // across versions that keep a block.
                let id = removed
                    .iter()
                    .find(|b| b.spec.target == spec.target && b.spec.scope == spec.scope)
                    .map_or_else(|| state.blocks.new_id(), |b| b.id.clone());
                let mut block = Block::new(id, spec, actor.clone(), now)?;
                block.fleet_version = Some(version);
                state.blocks.add(block.clone())?;
                added.push(block);
            }
            if let Some(on) = emergency {
                state.emergency.set(on, None);
            }
            let mode = mode.filter(|m| state.mode.choose(*m, &actor, now));
            let change = Change::Fleet { version, added, removed, emergency: state.emergency.clone(), mode };
            Ok((Some(change), ()))
        });
        match result {
            Ok(((), mut report)) => {
                report.notes.extend(notes);
                tracing::warn!(version, %report, "fleet policy in force");
                self.audit_ok(
                    &actor,
                    AuditAction::FleetPolicy,
                    json!({ "version": version, "signers": signers }),
                    &mut report,
                );
                Ok(report)
            }
            Err(message) => {
                self.failed(
                    &actor,
                    AuditAction::FleetPolicy,
                    json!({ "version": version, "signers": signers }),
                    message.clone(),
                );
                Err(message)
            }
        }
    }

    fn block(&self, actor: &Actor, spec: BlockSpec) -> Response {
        let requested = json!({ "spec": &spec });
        let max = self.config.max_blocks;
        let result = self.commit(actor, AuditAction::Block, |state, now| {
            let spec = spec.validated()?;
            if state.blocks.len() >= max {
                return Err(format!(
                    "the block table is full ({max} active blocks): lift some with `aegis-agent unblock ID`"
                ));
            }
            let block = Block::new(state.blocks.new_id(), spec, actor.clone(), now)?;
            state.blocks.add(block.clone())?;
            Ok((Some(Change::Blocked(block.clone())), block))
        });
        match result {
            Ok((block, mut report)) => {
                if let Scope::Cgroup(cgroup) = &block.spec.scope {
                    self.drills.note_block(&block.id, cgroup);
                }
                tracing::info!(id = %block.id, target = %block.spec.target, scope = %block.spec.scope, %actor, %report, "block set");
                self.audit_ok(actor, AuditAction::Block, json!({ "block": &block }), &mut report);
                Response::Ok(Reply::Blocked { block, report })
            }
            Err(message) => self.failed(actor, AuditAction::Block, requested, message),
        }
    }

    /// Start or end a drill: nothing is enforced, the mark only says whose calls are the
    /// drill's (see `control::drills`).
    fn drill(
        &self,
        actor: &Actor,
        on: bool,
        id: &str,
        cgroup: &str,
        policy: Option<super::drills::DrillPolicy>,
    ) -> Response {
        let action = if on { AuditAction::DrillStart } else { AuditAction::DrillEnd };
        let valid_id =
            id.starts_with("drill-") && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !valid_id {
            let message = "invalid drill id: expected `drill-` and letters, digits or '-' (at most 64 bytes)";
            return self.failed(actor, action, json!({ "id_bytes": id.len() }), message.into());
        }
        if let Some(Err(message)) = policy.as_ref().map(super::drills::DrillPolicy::validate) {
            return self.failed(actor, action, json!({ "id": id }), message);
        }
        let result = if on {
            match parse_cgroup(cgroup) {
                Ok(c) if c != "/" => self.drills.begin(id, &c, actor.pid, policy.clone()).map(|()| c),
                Ok(_) => Err("a drill's cgroup must be one made for it, not the root".into()),
                Err(e) => Err(e),
            }
        } else {
            Ok(String::new())
        };
        match result {
            Ok(c) => {
                let ended = !on && self.drills.end(id);
                let mut report = ApplyReport::default();
                if !on && !ended {
                    report.notes.push(format!("no drill {id} was in progress"));
                }
                tracing::info!(drill = id, cgroup = %c, on, %actor, "drill");
                self.audit_ok(actor, action, json!({ "id": id, "cgroup": c, "policy": policy }), &mut report);
                Response::Ok(Reply::Drills { drills: self.drills.list() })
            }
            Err(message) => self.failed(actor, action, json!({ "id": id, "cgroup": cgroup }), message),
        }
    }

    fn unblock(&self, actor: &Actor, id: &str) -> Response {
        if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            let message = "invalid block id: expected an id as `aegis-agent blocks` lists them (blk- and 8 hex digits)";
            return self.failed(actor, AuditAction::Unblock, json!({ "id_bytes": id.len() }), message.into());
        }
        let result = self.commit(actor, AuditAction::Unblock, |state, _| {
            let block = state
                .blocks
                .remove(id)
                .ok_or_else(|| format!("no active block {id}: `aegis-agent blocks` lists the active ones"))?;
            Ok((Some(Change::Unblocked(block.clone())), block))
        });
        match result {
            Ok((block, mut report)) => {
                tracing::info!(id = %block.id, target = %block.spec.target, %actor, %report, "block lifted");
                self.audit_ok(actor, AuditAction::Unblock, json!({ "block": &block }), &mut report);
                Response::Ok(Reply::Unblocked { block, report })
            }
            Err(message) => self.failed(actor, AuditAction::Unblock, json!({ "id": id }), message),
        }
    }

    fn emergency(&self, actor: &Actor, on: bool, cgroup: Option<String>) -> Response {
        let action = if on { AuditAction::EmergencyOn } else { AuditAction::EmergencyOff };
        let cgroup = match cgroup.as_deref().map(parse_cgroup).transpose() {
            Ok(c) => c,
            Err(message) => return self.failed(actor, action, json!({ "cgroup": cgroup }), message),
        };
        let max = self.config.max_blocks;
        let result = self.commit(actor, action, |state, _| {
            if on && cgroup.is_some() && state.emergency.cgroups.len() >= max {
                return Err(format!("emergency mode is on for {max} cgroups already: use it host-wide"));
            }
            let changed = state.emergency.set(on, cgroup.as_deref());
            let change =
                changed.then(|| Change::Emergency { on, cgroup: cgroup.clone(), state: state.emergency.clone() });
            Ok((change, (state.emergency.clone(), changed)))
        });
        match result {
            Ok(((emergency, changed), mut report)) => {
                if !changed {
                    let place = cgroup.as_deref().map_or_else(|| "host-wide".to_owned(), |c| format!("for cgroup {c}"));
                    report.notes.push(format!("emergency mode was already {} {place}", if on { "on" } else { "off" }));
                }
                tracing::warn!(%emergency, %actor, changed, "emergency mode");
                let details = json!({ "cgroup": &cgroup, "changed": changed, "emergency": &emergency });
                self.audit_ok(actor, action, details, &mut report);
                Response::Ok(Reply::Emergency { emergency, changed, report })
            }
            Err(message) => self.failed(actor, action, json!({ "cgroup": cgroup }), message),
        }
    }

    /// Switch the enforcement mode (an operator's `enforce on|off`); kept across restarts.
    fn enforce(&self, actor: &Actor, mode: EnforceMode) -> Response {
        let action = Self::mode_action(mode);
        let result = self.commit(actor, action, |state, now| {
            let changed = state.mode.choose(mode, actor, now);
            Ok((changed.then_some(Change::Mode { mode }), (state.mode.clone(), changed)))
        });
        match result {
            Ok(((state, changed), mut report)) => {
                if !changed {
                    report.notes.push(format!("the enforcement mode was already {mode}"));
                }
                tracing::warn!(mode = %state, %actor, changed, "enforcement mode");
                self.audit_ok(actor, action, json!({ "changed": changed, "mode": &state }), &mut report);
                Response::Ok(Reply::Enforce { mode: state, changed, report })
            }
            Err(message) => self.failed(actor, action, json!({ "mode": mode }), message),
        }
    }

    /// Lift what drills whose command is gone left behind (see `control::drills`).
    fn reap_drills(&self) {
        if self.drills.is_empty() {
            return;
        }
        for mark in self.drills.stale() {
            let why = format!("drill {}: its command (pid {}) ended without ending the drill", mark.id, mark.pid);
            tracing::warn!(drill = %mark.id, pid = mark.pid, cgroup = %mark.cgroup, "{why}: lifting what it left");
            let mut lifted = self.lift_drill_leftovers(&mark.cgroup, &mark.blocks);
            self.drills.end(&mark.id);
            lifted.push("its mark".into());
            let message = format!("{why}; the agent lifted: {}", lifted.join(", "));
            let details = json!({ "id": mark.id, "cgroup": mark.cgroup, "stale": true, "lifted": lifted });
            self.audit(&self.agent, AuditAction::DrillEnd, details, Outcome::Ok, Some(message));
        }
    }

    /// Lift the blocks `ids` and every block scoped to (or cutting off) drill cgroup
    /// `cgroup`, emergency mode for it, and remove the cgroup (ending the drill clients still
    /// in it: nothing else is put there); what was lifted.
    fn lift_drill_leftovers(&self, cgroup: &str, ids: &[String]) -> Vec<String> {
        use super::blocks::BlockTarget;
        let mut lifted = Vec::new();
        let agent = self.agent.clone();
        let mut blocks: Vec<String> = self
            .view
            .blocks()
            .into_iter()
            .filter(|b| {
                matches!(&b.spec.scope, Scope::Cgroup(c) if crate::cgroup::covers(cgroup, c))
                    || matches!(&b.spec.target, BlockTarget::Tenant(c) if crate::cgroup::covers(cgroup, c))
                    || ids.contains(&b.id)
            })
            .map(|b| b.id)
            .collect();
        blocks.dedup();
        for id in blocks {
            match self.unblock(&agent, &id) {
                Response::Ok(_) => lifted.push(format!("block {id}")),
                Response::Error { message } => tracing::error!(block = %id, %message, "a stale drill's block stays"),
            }
        }
        let emergencies: Vec<String> =
            self.view.emergency().cgroups.into_iter().filter(|c| crate::cgroup::covers(cgroup, c)).collect();
        for c in emergencies {
            match self.emergency(&agent, false, Some(c.clone())) {
                Response::Ok(_) => lifted.push(format!("emergency mode for {c}")),
                Response::Error { message } => {
                    tracing::error!(cgroup = %c, %message, "a stale drill's emergency stays")
                }
            }
        }
        match crate::kernel::cgroup2_root() {
            Some(root) => {
                let dir = root.join(cgroup.trim_start_matches('/'));
                match crate::cgroup::remove_dir_killing(&dir) {
                    Ok(true) => lifted.push(format!("its cgroup {}", dir.display())),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "a stale drill's cgroup stays"),
                }
            }
            None => tracing::error!(%cgroup, "no cgroup v2 mount: a stale drill's cgroup is not removed"),
        }
        lifted
    }

    /// At start: what drills left in the saved state (no drill is in progress for a
    /// starting agent: marks are not saved), lifted.
    fn lift_drills_at_start(&self) {
        use super::blocks::BlockTarget;
        let state = self.view.snapshot();
        let mut cgroups: Vec<String> = state.emergency.cgroups.iter().cloned().collect();
        for b in state.blocks.list() {
            if let Scope::Cgroup(c) = &b.spec.scope {
                cgroups.push(c.clone());
            }
            if let BlockTarget::Tenant(c) = &b.spec.target {
                cgroups.push(c.clone());
            }
        }
        // The drill cgroup itself: `.../aegis-drill-<id>`.
        let mut drills: Vec<String> = cgroups
            .iter()
            .filter(|c| super::drills::is_drill_cgroup(c))
            .filter_map(|c| {
                let mut parts: Vec<&str> = c.split('/').collect();
                let at = parts.iter().position(|p| p.starts_with(super::drills::CGROUP_PREFIX))?;
                parts.truncate(at + 1);
                Some(parts.join("/"))
            })
            .collect();
        drills.sort();
        drills.dedup();
        for cgroup in drills {
            let lifted = self.lift_drill_leftovers(&cgroup, &[]);
            let message = format!(
                "a drill in {cgroup} did not end before the agent stopped; the agent lifted: {}",
                lifted.join(", ")
            );
            tracing::warn!(%cgroup, "{message}");
            let details = json!({ "cgroup": cgroup, "stale": true, "lifted": lifted });
            self.audit(&self.agent, AuditAction::DrillEnd, details, Outcome::Ok, Some(message));
        }
    }

    /// Lift the blocks that have ended at `now_ms`.
    fn expire_due(&self, now_ms: u64) {
        let _ops = self.ops.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.view.read(|s| s.blocks.has_expired(now_ms)) {
            return;
        }
        let mut state = self.view.snapshot();
        let expired = state.blocks.expire(now_ms);
        if let Err(e) = state.save(&self.config.state_file) {
            tracing::error!(error = %format!("{e:#}"), "cannot save the state file after expiry");
        }
        self.view.replace(state);
        let result = self.apply(&Change::Expired(expired.clone()));
        if let Err(e) = &result {
            tracing::error!(error = %e, "expired blocks could not be lifted from enforcement");
        }
        for block in &expired {
            tracing::info!(id = %block.id, target = %block.spec.target, "block expired");
            let (outcome, message, report) = match &result {
                Ok(report) => (Outcome::Ok, report.to_string(), Some(report)),
                Err(e) => (Outcome::Failed, e.clone(), None),
            };
            let details = json!({ "block": block, "report": report });
            self.audit(&self.agent, AuditAction::Expire, details, outcome, Some(message));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        os::unix::{net::UnixStream as StdStream, process::CommandExt as _},
        process::{Command, Stdio},
        sync::atomic::{AtomicBool, Ordering},
        time::Instant,
    };

    use super::*;
    use crate::control::{
        audit::{AuditEntry, read_entries},
        blocks::{BlockTarget, Expiry, Scope},
        client::{ClientError, call, request},
        protocol::decode_response,
        testutil::TempDir,
    };

    /// Records every change; fails them while `fail` is set.
    #[derive(Default)]
    struct Recorder {
        changes: Mutex<Vec<Change>>,
        fail: AtomicBool,
    }

    impl ControlHandler for Recorder {
        fn apply(&self, change: &Change) -> Result<ApplyReport, String> {
            if self.fail.load(Ordering::SeqCst) {
                return Err("map update failed: ENOSPC".into());
            }
            self.changes.lock().unwrap().push(change.clone());
            Ok(ApplyReport { killed_connections: 3, notes: vec![] })
        }
    }

    impl Recorder {
        fn changes(&self) -> Vec<Change> {
            self.changes.lock().unwrap().clone()
        }
    }

    fn config(dir: &TempDir) -> ControlConfig {
        ControlConfig {
            socket: dir.path().join("run/control.sock"),
            state_file: dir.path().join("lib/blocks.json"),
            audit_log: dir.path().join("log/audit.jsonl"),
            expiry_check_ms: 100,
            ..ControlConfig::default()
        }
    }

    fn start(config: &ControlConfig) -> (ServerHandle, Arc<Recorder>) {
        start_in(config, EnforceMode::Observe)
    }

    /// [`start`] with the config's `enforce.mode` set to `configured`.
    fn start_in(config: &ControlConfig, configured: EnforceMode) -> (ServerHandle, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        (ControlServer::start(config.clone(), configured, recorder.clone()).unwrap(), recorder)
    }

    fn spec(target: BlockTarget, expires: Option<Expiry>) -> BlockSpec {
        BlockSpec { target, scope: Scope::Host, expires, fallback: None, reason: "incident 42".into() }
    }

    fn list(socket: &Path) -> (Vec<Block>, Emergency) {
        match call(socket, &Request::List).unwrap() {
            Reply::Blocks { blocks, emergency, .. } => (blocks, emergency),
            other => panic!("{other:?}"),
        }
    }

    fn error_of(response: Response) -> String {
        match response {
            Response::Error { message } => message,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn refused(result: Result<Reply, ClientError>) -> String {
        match result {
            Err(ClientError::Refused(message)) => message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Send raw bytes, read the whole answer.
    fn raw(socket: &Path, bytes: &[u8]) -> Response {
        let mut s = StdStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let line = out.split(|&b| b == b'\n').next().unwrap();
        decode_response(line).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
    }

    fn audit_summary(config: &ControlConfig) -> Vec<(AuditAction, Outcome)> {
        // The `pending` line before each change: see `a_change_is_audited_before_it_is_saved`.
        read_entries(&config.audit_log)
            .unwrap()
            .iter()
            .filter(|e| e.result != Outcome::Pending)
            .map(|e| (e.action, e.result))
            .collect()
    }

    fn is_root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        eprintln!("skipped: needs root");
        false
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn max_blocks_is_bounded_by_what_the_state_file_holds() {
        let config = |max_blocks| ControlConfig { max_blocks, ..ControlConfig::default() };
        config(MAX_BLOCKS).validate().unwrap();
        for bad in [0, MAX_BLOCKS + 1] {
            let err = config(bad).validate().unwrap_err().to_string();
            assert!(err.contains("must be 1 to 16384"), "{err}");
        }
    }

    #[test]
    fn block_list_unblock_over_the_socket() {
        let dir = TempDir::new("srv");
        let config = config(&dir);
        let (server, recorder) = start(&config);
        let socket = server.socket().to_owned();
        assert_eq!(mode(&socket), 0o600, "no group: root only");
        assert_eq!(mode(socket.parent().unwrap()), 0o750);

        let reply =
            call(&socket, &Request::Block(spec(BlockTarget::Provider("OpenAI".into()), Some(Expiry::AfterSecs(900)))));
        let Ok(Reply::Blocked { block, report }) = reply else { panic!("{reply:?}") };
        assert_eq!(report, ApplyReport { killed_connections: 3, notes: vec![] });
        assert_eq!(block.spec.target, BlockTarget::Provider("openai".into()));
        assert_eq!(block.created_by.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(block.created_by.pid, std::process::id());
        assert!(!block.created_by.comm.is_empty());
        assert_eq!(block.expires_unix_ms, Some(block.created_unix_ms + 900_000));

        assert_eq!(list(&socket), (vec![block.clone()], Emergency::default()));
        assert_eq!(server.view().blocks(), vec![block.clone()]);
        let call_subject = Subject { provider: Some("openai"), ..Subject::default() };
        assert_eq!(server.view().matching_block(&call_subject), Some(block.clone()));
        assert_eq!(ControlState::load(&config.state_file).unwrap().blocks.list(), std::slice::from_ref(&block));

        let dup = refused(call(&socket, &Request::Block(spec(BlockTarget::Provider("openai".into()), None))));
        assert_eq!(
            dup,
            format!("provider openai is already blocked (host) by {}: unblock it first to change it", block.id)
        );

        let reply = call(&socket, &Request::Unblock { id: block.id.clone() });
        assert!(matches!(&reply, Ok(Reply::Unblocked { block: b, .. }) if *b == block), "{reply:?}");
        assert_eq!(list(&socket), (vec![], Emergency::default()));
        assert_eq!(server.view().matching_block(&call_subject), None);
        assert_eq!(
            refused(call(&socket, &Request::Unblock { id: block.id.clone() })),
            format!("no active block {}: `aegis-agent blocks` lists the active ones", block.id)
        );
        assert_eq!(
            refused(call(&socket, &Request::Unblock { id: "blk-\u{1b}[2J".into() })),
            "invalid block id: expected an id as `aegis-agent blocks` lists them (blk- and 8 hex digits)"
        );

        let on = call(&socket, &Request::Emergency { on: true, cgroup: None }).unwrap();
        assert!(matches!(&on, Reply::Emergency { changed: true, emergency, .. } if emergency.host), "{on:?}");
        let again = call(&socket, &Request::Emergency { on: true, cgroup: None }).unwrap();
        let Reply::Emergency { changed: false, report, .. } = again else { panic!("{again:?}") };
        assert_eq!(report.notes, ["emergency mode was already on host-wide"]);
        call(&socket, &Request::Emergency { on: true, cgroup: Some("/team-a/".into()) }).unwrap();
        call(&socket, &Request::Emergency { on: false, cgroup: None }).unwrap();
        assert!(server.view().emergency_applies_to("/team-a/job") && !server.view().emergency_applies_to("/team-b"));
        let Reply::Status(status) = call(&socket, &Request::Status).unwrap() else { panic!() };
        assert_eq!((status.pid, status.protocol, status.blocks), (std::process::id(), 1, 0));
        assert_eq!(status.emergency.cgroups.iter().collect::<Vec<_>>(), ["/team-a"]);

        let changes = recorder.changes();
        assert_eq!(changes.len(), 6, "{changes:?}");
        assert_eq!(
            changes[0],
            Change::Restored { blocks: vec![], emergency: Emergency::default(), mode: EnforceMode::Observe }
        );
        assert_eq!(changes[1], Change::Blocked(block.clone()));
        assert_eq!(changes[2], Change::Unblocked(block.clone()));
        assert!(matches!(&changes[4], Change::Emergency { on: true, cgroup: Some(c), .. } if c == "/team-a"));

        use AuditAction as A;
        assert_eq!(
            audit_summary(&config),
            [
                (A::Restore, Outcome::Ok),
                (A::Block, Outcome::Ok),
                (A::Block, Outcome::Failed),
                (A::Unblock, Outcome::Ok),
                (A::Unblock, Outcome::Failed),
                (A::Unblock, Outcome::Failed),
                (A::EmergencyOn, Outcome::Ok),
                (A::EmergencyOn, Outcome::Ok),
                (A::EmergencyOn, Outcome::Ok),
                (A::EmergencyOff, Outcome::Ok),
            ]
        );
        let entries: Vec<AuditEntry> =
            read_entries(&config.audit_log).unwrap().into_iter().filter(|e| e.result != Outcome::Pending).collect();
        let AuditEntry { actor, details, message, .. } = &entries[1];
        assert_eq!((actor.uid, actor.pid), (nix::unistd::geteuid().as_raw(), std::process::id()));
        assert_eq!(details["block"]["id"], block.id.as_str());
        assert_eq!(details["block"]["spec"]["reason"], "incident 42");
        assert_eq!(details["report"]["killed_connections"], 3);
        assert_eq!(message.as_deref(), Some("killed 3 connections"));
        assert!(entries[2].message.as_deref().unwrap().contains("already blocked"));

        server.shutdown();
        assert!(!socket.exists(), "socket removed at shutdown");
    }

    #[test]
    fn enforce_mode_switches_are_saved_audited_and_outlive_a_restart() {
        let dir = TempDir::new("mode");
        let config = config(&dir);
        let (server, recorder) = start(&config);
        let socket = server.socket().to_owned();
        let mode_of = |reply: Reply| match reply {
            Reply::Enforce { mode, changed, report } => (mode, changed, report),
            other => panic!("{other:?}"),
        };
        let status_mode = |socket: &Path| match call(socket, &Request::Status).unwrap() {
            Reply::Status(s) => s.mode.expect("this agent reports its mode"),
            other => panic!("{other:?}"),
        };
        assert_eq!(server.view().mode(), EnforceMode::Observe, "the config's mode");
        assert_eq!(status_mode(&socket), ModeState::at_start(EnforceMode::Observe, None).0);

        let (mode, changed, report) = mode_of(call(&socket, &Request::Enforce { on: true }).unwrap());
        assert!(changed);
        assert_eq!(report, ApplyReport { killed_connections: 3, notes: vec![] });
        assert_eq!((mode.mode, mode.configured), (EnforceMode::Enforce, EnforceMode::Observe));
        let choice = mode.operator.clone().expect("the operator's choice");
        assert_eq!((choice.set_by.pid, choice.config_mode), (std::process::id(), EnforceMode::Observe));
        assert_eq!(server.view().mode(), EnforceMode::Enforce);
        assert_eq!(recorder.changes().last(), Some(&Change::Mode { mode: EnforceMode::Enforce }));
        assert_eq!(ControlState::load(&config.state_file).unwrap().mode.operator, Some(choice.clone()));
        let Reply::Blocks { mode: listed, .. } = call(&socket, &Request::List).unwrap() else { panic!() };
        assert_eq!(listed, Some(mode.clone()));

        let (again, changed, report) = mode_of(call(&socket, &Request::Enforce { on: true }).unwrap());
        assert!(!changed);
        assert_eq!(report.notes, ["the enforcement mode was already enforce"]);
        assert_eq!(again, mode, "the first choice stays");
        let changes = recorder.changes().len();
        server.shutdown();

        // Same config: the operator's choice holds, and is what the handler restores.
        let (server, recorder) = start(&config);
        assert_eq!(changes, 2, "restore and one switch");
        assert_eq!(server.view().mode_state(), mode);
        assert!(matches!(recorder.changes()[0], Change::Restored { mode: EnforceMode::Enforce, .. }));
        let (observe, changed, _) = mode_of(call(&socket, &Request::Enforce { on: false }).unwrap());
        assert!(changed);
        assert_eq!(
            observe.operator.as_ref().map(|c| (c.mode, c.config_mode)),
            Some((EnforceMode::Observe, EnforceMode::Observe))
        );
        server.shutdown();

        // The config now says enforce, unlike when the operator chose observe: the edited
        // config decides, the choice is dropped from the state file, and the audit says so.
        let (server, recorder) = start_in(&config, EnforceMode::Enforce);
        assert_eq!(server.view().mode_state(), ModeState::at_start(EnforceMode::Enforce, None).0);
        assert!(matches!(recorder.changes()[0], Change::Restored { mode: EnforceMode::Enforce, .. }));
        assert_eq!(ControlState::load(&config.state_file).unwrap().mode.operator, None);
        drop(server);

        use AuditAction as A;
        assert_eq!(
            audit_summary(&config),
            [
                (A::Restore, Outcome::Ok),
                (A::EnforceOn, Outcome::Ok),
                (A::EnforceOn, Outcome::Ok),
                (A::Restore, Outcome::Ok),
                (A::EnforceOff, Outcome::Ok),
                (A::EnforceOn, Outcome::Ok),
                (A::Restore, Outcome::Ok),
            ]
        );
        let entries: Vec<AuditEntry> =
            read_entries(&config.audit_log).unwrap().into_iter().filter(|e| e.result != Outcome::Pending).collect();
        assert_eq!(entries[1].details["mode"]["mode"], "enforce");
        assert_eq!(entries[1].details["changed"], true);
        assert_eq!(entries[1].actor.pid, std::process::id());
        assert_eq!(entries[2].details["changed"], false);
        assert_eq!(entries[3].details["mode"]["operator"]["mode"], "enforce", "restore names the mode");
        let replaced = &entries[5];
        assert_eq!(replaced.actor.pid, std::process::id(), "by the agent at start");
        let message = replaced.message.as_deref().unwrap();
        assert!(
            message.starts_with("the config's enforce.mode is now enforce, not observe as when ")
                && message.ends_with(": the edited config decides"),
            "{message}"
        );
        assert_eq!(replaced.details["replaced"]["mode"], "observe");
    }

    #[test]
    fn a_drill_marks_its_cgroup_and_blocks_until_it_ends() {
        let dir = TempDir::new("drill");
        let config = config(&dir);
        let (server, _) = start(&config);
        let drill = |on: bool, id: &str, cgroup: &str| {
            call(&config.socket, &Request::Drill { on, id: id.into(), cgroup: cgroup.into(), policy: None })
        };
        assert!(refused(drill(true, "nope", "/d")).starts_with("invalid drill id"));
        assert_eq!(refused(drill(true, "drill-1", "/")), "a drill's cgroup must be one made for it, not the root");
        match drill(true, "drill-1", "/aegis-drill-1").unwrap() {
            Reply::Drills { drills } => assert_eq!(drills[0].cgroup, "/aegis-drill-1"),
            other => panic!("{other:?}"),
        }
        let scoped =
            BlockSpec { scope: Scope::Cgroup("/aegis-drill-1".into()), ..spec(BlockTarget::Model("m".into()), None) };
        let Reply::Blocked { block, .. } = call(&config.socket, &Request::Block(scoped)).unwrap() else { panic!() };
        let Reply::Blocked { block: other, .. } =
            call(&config.socket, &Request::Block(spec(BlockTarget::Model("m".into()), None))).unwrap()
        else {
            panic!()
        };
        let marks = server.drills();
        assert_eq!(marks.of_block(&block.id).as_deref(), Some("drill-1"));
        assert_eq!(marks.of_block(&other.id), None, "a host-wide block is not the drill's");
        assert_eq!(marks.of_cgroup("/aegis-drill-1/x").as_deref(), Some("drill-1"));
        drill(false, "drill-1", "").unwrap();
        assert_eq!(marks.of_cgroup("/aegis-drill-1"), None);
        let audit = std::fs::read_to_string(&config.audit_log).unwrap();
        assert!(audit.contains("\"drill_start\"") && audit.contains("\"drill_end\""), "{audit}");
    }

    #[test]
    fn handler_failure_changes_nothing() {
        let dir = TempDir::new("fail");
        let config = config(&dir);
        let (server, recorder) = start(&config);
        recorder.fail.store(true, Ordering::SeqCst);
        let message = refused(call(server.socket(), &Request::Block(spec(BlockTarget::Model("gpt-4o".into()), None))));
        assert_eq!(message, "the agent could not enforce the change, so nothing changed: map update failed: ENOSPC");
        assert!(server.view().blocks().is_empty());
        assert!(ControlState::load(&config.state_file).unwrap().blocks.is_empty());
        let message = refused(call(server.socket(), &Request::Emergency { on: true, cgroup: None }));
        assert!(message.starts_with("the agent could not enforce the change"), "{message}");
        assert!(server.view().emergency().is_off());
        // A mode switch the handler cannot follow (the gate) is undone too.
        let message = refused(call(server.socket(), &Request::Enforce { on: true }));
        assert!(message.starts_with("the agent could not enforce the change"), "{message}");
        assert_eq!(server.view().mode(), EnforceMode::Observe);
        assert_eq!(ControlState::load(&config.state_file).unwrap().mode.operator, None);
        let entries: Vec<AuditEntry> =
            read_entries(&config.audit_log).unwrap().into_iter().filter(|e| e.result != Outcome::Pending).collect();
        assert_eq!(entries[1].action, AuditAction::Block);
        assert_eq!(entries[1].result, Outcome::Failed);
        assert_eq!(
            entries[1].message.as_deref(),
            Some("the agent could not enforce the change, so nothing changed: map update failed: ENOSPC")
        );
        assert_eq!(entries[1].details["spec"]["target"]["model"], "gpt-4o");

        // Enforcement works again: the change goes through.
        recorder.fail.store(false, Ordering::SeqCst);
        assert!(call(server.socket(), &Request::Block(spec(BlockTarget::Model("gpt-4o".into()), None))).is_ok());
    }

    /// A change is in the audit log before it is in the state file: a `pending` line (what,
    /// by whom), then the line with the result; a restart's `restore` line names the blocks it
    /// found saved, so a change whose agent died between the two lines is still accounted for.
    #[test]
    fn a_change_is_audited_before_it_is_saved() {
        let dir = TempDir::new("pending");
        let config = config(&dir);
        let (server, _) = start(&config);
        let Reply::Blocked { block, .. } =
            call(server.socket(), &Request::Block(spec(BlockTarget::Model("m".into()), None))).unwrap()
        else {
            panic!()
        };
        let entries = read_entries(&config.audit_log).unwrap();
        let at = entries.iter().position(|e| e.action == AuditAction::Block).unwrap();
        assert_eq!((entries[at].result, entries[at + 1].result), (Outcome::Pending, Outcome::Ok));
        assert_eq!(entries[at].details["block"]["id"], block.id.as_str());
        assert_eq!(entries[at].actor, entries[at + 1].actor);
        server.shutdown();
        let (_server, _) = start(&config);
        let entries = read_entries(&config.audit_log).unwrap();
        let restore = entries.iter().rev().find(|e| e.action == AuditAction::Restore).unwrap();
        assert_eq!(restore.details["ids"], serde_json::json!([block.id]));
    }

    #[test]
    fn what_a_drill_left_in_the_saved_state_is_lifted_at_start() {
        let dir = TempDir::new("drill-left");
        let config = config(&dir);
        // A drill killed with SIGKILL, then the agent restarted: its emergency mode, its
        // blocks (scoped to it, or cutting it off) are in the state; an operator's are too.
        let mut saved = ControlState::default();
        saved.emergency.set(true, Some("/x/aegis-drill-20261206-ab12"));
        saved.emergency.set(true, Some("/team-a"));
        let agent = Actor::agent();
        let scoped = BlockSpec {
            scope: Scope::Cgroup("/x/aegis-drill-20261206-ab12".into()),
            ..spec(BlockTarget::Model("m".into()), None)
        };
        saved.blocks.add(Block::new("blk-00000001".into(), scoped, agent.clone(), 1000).unwrap()).unwrap();
        let tenant = spec(BlockTarget::Tenant("/x/aegis-drill-20261206-ab12".into()), None);
        saved.blocks.add(Block::new("blk-00000002".into(), tenant, agent.clone(), 1000).unwrap()).unwrap();
        let operator = spec(BlockTarget::Model("kept".into()), None);
        saved.blocks.add(Block::new("blk-00000003".into(), operator, agent, 1000).unwrap()).unwrap();
        saved.save(&config.state_file).unwrap();

        let (server, _) = start(&config);
        let (blocks, emergency) = list(server.socket());
        let ids: Vec<&str> = blocks.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, ["blk-00000003"], "the operator's block stays");
        assert_eq!(emergency.cgroups.iter().collect::<Vec<_>>(), ["/team-a"]);
        let entries = read_entries(&config.audit_log).unwrap();
        let end = entries.iter().find(|e| e.action == AuditAction::DrillEnd).expect("audited");
        assert_eq!(end.details["stale"], true);
        assert_eq!(end.details["cgroup"], "/x/aegis-drill-20261206-ab12");
    }

    #[test]
    fn restart_keeps_blocks_and_expiry_lifts_them() {
        let dir = TempDir::new("restart");
        let config = config(&dir);
        // A block that expired while no agent ran.
        let mut saved = ControlState::default();
        let agent = Actor::agent();
        let old = Block::new(
            "blk-00000001".into(),
            spec(BlockTarget::Model("old".into()), Some(Expiry::AfterSecs(1))),
            agent,
            1000,
        )
        .unwrap();
        saved.blocks.add(old).unwrap();
        saved.save(&config.state_file).unwrap();

        let (server, _) = start(&config);
        let socket = server.socket().to_owned();
        assert!(list(&socket).0.is_empty(), "expired at start");
        let Ok(Reply::Blocked { block: forever, .. }) =
            call(&socket, &Request::Block(spec(BlockTarget::Tenant("/t".into()), None)))
        else {
            panic!()
        };
        // Long enough to survive the restart below, short enough for a test.
        let Ok(Reply::Blocked { block: short, .. }) =
            call(&socket, &Request::Block(spec(BlockTarget::Model("m".into()), Some(Expiry::AfterSecs(3)))))
        else {
            panic!()
        };
        call(&socket, &Request::Emergency { on: true, cgroup: Some("/team-a".into()) }).unwrap();
        server.shutdown();

        let (server, recorder) = start(&config);
        let (_, emergency) = list(&socket);
        assert_eq!(emergency.cgroups.iter().collect::<Vec<_>>(), ["/team-a"]);
        let first = recorder.changes().into_iter().next().unwrap();
        assert_eq!(
            first,
            Change::Restored { blocks: vec![forever.clone(), short.clone()], emergency, mode: EnforceMode::Observe }
        );

        let deadline = Instant::now() + Duration::from_secs(8);
        while list(&socket).0.len() > 1 {
            assert!(Instant::now() < deadline, "the 3 s block did not expire");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(list(&socket).0, std::slice::from_ref(&forever));
        assert_eq!(recorder.changes()[1..], [Change::Expired(vec![short.clone()])]);
        assert_eq!(ControlState::load(&config.state_file).unwrap().blocks.list(), [forever]);

        let entries = read_entries(&config.audit_log).unwrap();
        assert_eq!((entries[0].action, entries[0].result), (AuditAction::Expire, Outcome::Pending), "before the save");
        assert_eq!((entries[1].action, entries[1].result), (AuditAction::Expire, Outcome::Ok));
        assert_eq!(entries[1].message.as_deref(), Some("expired while the agent was not running"));
        assert_eq!(entries[1].details["block"]["id"], "blk-00000001");
        let expiry = entries
            .iter()
            .find(|e| {
                e.action == AuditAction::Expire
                    && e.result != Outcome::Pending
                    && e.details["block"]["id"] == short.id.as_str()
            })
            .unwrap();
        assert_eq!(expiry.result, Outcome::Ok);
        assert_eq!(expiry.actor.pid, std::process::id(), "expired by the agent");
        drop(server);
    }

    #[test]
    fn bad_requests_are_answered_and_the_server_survives() {
        let dir = TempDir::new("bad");
        let config = config(&dir);
        let (server, _) = start(&config);
        let socket = server.socket().to_owned();

        let m = error_of(raw(&socket, b"{not json\n"));
        assert_eq!(m, "malformed request: not JSON (key must be a string at line 1 column 2)");
        let m = error_of(raw(&socket, br#"{"v":1,"op":"explode"}"#));
        assert!(m.starts_with("invalid request: unknown variant `explode`"), "{m}");

        let mut long = vec![b'a'; 70 * 1024];
        long.push(b'\n');
        let too_long = "request too long: more than 65536 bytes without a newline; closing the connection";
        assert_eq!(error_of(raw(&socket, &long)), too_long);
        // Exactly the limit is fine (and then is not JSON).
        let mut limit = vec![b' '; 64 * 1024 - 2];
        limit.splice(0..0, *b"{}");
        limit.push(b'\n');
        assert_eq!(error_of(raw(&socket, &limit)), "invalid request: missing field `op`");
        // Through the client: a 1 MiB request; the agent stops reading, answers, closes.
        let huge = BlockSpec { reason: "x".repeat(1 << 20), ..spec(BlockTarget::Model("m".into()), None) };
        assert_eq!(error_of(request(&socket, &Request::Block(huge)).unwrap()), too_long);

        let empty_reason = BlockSpec { reason: String::new(), ..spec(BlockTarget::Model("m".into()), None) };
        assert_eq!(
            refused(call(&socket, &Request::Block(empty_reason))),
            "the reason is empty: give one line saying why (it goes into the audit log)"
        );
        assert!(matches!(call(&socket, &Request::Status), Ok(Reply::Status(_))));

        use AuditAction as A;
        assert_eq!(
            audit_summary(&config),
            [
                (A::Restore, Outcome::Ok),
                (A::Request, Outcome::Refused),
                (A::Request, Outcome::Refused),
                (A::Request, Outcome::Refused),
                (A::Request, Outcome::Refused),
                (A::Request, Outcome::Refused),
                (A::Block, Outcome::Failed),
            ]
        );
        drop(server);
    }

    #[test]
    fn slow_clients_time_out() {
        let dir = TempDir::new("slow");
        let config = ControlConfig { read_timeout_ms: 300, ..config(&dir) };
        let (server, _) = start(&config);
        let started = Instant::now();
        let mut s = StdStream::connect(server.socket()).unwrap();
        s.write_all(b"{\"op\":").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(
            error_of(decode_response(out.trim_end().as_bytes()).unwrap()),
            "no complete request within 300 ms: send one JSON object followed by a newline"
        );
        assert!(call(server.socket(), &Request::List).is_ok());
    }

    #[test]
    fn idle_clients_give_way_and_a_flood_is_refused_and_audited() {
        let dir = TempDir::new("limit");
        let config = ControlConfig { max_clients: 2, read_timeout_ms: 5000, ..config(&dir) };
        let (server, _) = start(&config);
        // Clients that connect and say nothing hold every place, and are refilled.
        let mut idle: Vec<_> = (0..2).map(|_| StdStream::connect(server.socket()).unwrap()).collect();
        for _ in 0..3 {
            let started = Instant::now();
            assert!(call(server.socket(), &Request::Status).is_ok(), "an operator gets through idle clients");
            assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
            idle.push(StdStream::connect(server.socket()).unwrap());
        }
        drop(idle);
        let audit = read_entries(&config.audit_log).unwrap();
        let evicted = audit.iter().filter(|e| e.action == AuditAction::Connect && e.details["idle"] == true).count();
        assert!(evicted >= 3, "each idle client closed to make room is audited: {audit:#?}");
    }

    #[test]
    fn socket_setup() {
        if !is_root() {
            return;
        }
        let dir = TempDir::new("sock");
        let config = config(&dir);
        std::fs::create_dir_all(config.socket.parent().unwrap()).unwrap();

        // Not a socket: left alone.
        std::fs::write(&config.socket, "precious").unwrap();
        let e = format!(
            "{:#}",
            ControlServer::start(config.clone(), EnforceMode::Observe, Arc::new(NoopHandler)).unwrap_err()
        );
        assert_eq!(
            e,
            format!(
                "{} exists and is not a socket: refusing to remove it; move it away or configure another control \
                 socket path",
                config.socket.display()
            )
        );
        assert_eq!(std::fs::read_to_string(&config.socket).unwrap(), "precious");
        std::fs::remove_file(&config.socket).unwrap();

        // A stale socket: replaced.
        drop(std::os::unix::net::UnixListener::bind(&config.socket).unwrap());
        let (server, _) = start(&config);
        // A live one: refused, and the first server keeps working.
        let e = format!(
            "{:#}",
            ControlServer::start(config.clone(), EnforceMode::Observe, Arc::new(NoopHandler)).unwrap_err()
        );
        assert!(e.starts_with("another process is already serving the control socket"), "{e}");
        assert!(call(server.socket(), &Request::Status).is_ok());
        drop(server);
        assert!(!config.socket.exists());

        // With a group: 0660, group-owned, and a new directory is group-owned too.
        let config = ControlConfig { group: Some(4242), socket: dir.path().join("grp/run/control.sock"), ..config };
        let (server, _) = start(&config);
        let meta = std::fs::metadata(server.socket()).unwrap();
        assert_eq!((meta.permissions().mode() & 0o777, meta.uid(), meta.gid()), (0o660, 0, 4242));
        let parent = std::fs::metadata(config.socket.parent().unwrap()).unwrap();
        assert_eq!((parent.permissions().mode() & 0o777, parent.gid()), (0o750, 4242));
        let leftovers: Vec<_> =
            std::fs::read_dir(config.socket.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, ["control.sock"]);
    }

    const HELPER_SOCKET: &str = "AEGIS_CONTROL_TEST_SOCKET";
    const HELPER_BIND: &str = "AEGIS_CONTROL_TEST_BIND";
    /// linux/capability.h (the libc crate does not have it).
    const CAP_CHOWN: libc::c_ulong = 0;

    /// Run by `a_control_group_works_without_cap_chown` as root without CAP_CHOWN: bind the
    /// socket given in the environment for `[control] group = GID`; print what came of it.
    #[test]
    #[ignore = "helper, run by a_control_group_works_without_cap_chown without CAP_CHOWN"]
    fn bind_without_chown_helper() {
        let Ok(spec) = std::env::var(HELPER_BIND) else {
            return;
        };
        let (gid, socket) = spec.split_once(' ').unwrap();
        let config = ControlConfig { socket: socket.into(), group: Some(gid.parse().unwrap()), ..Default::default() };
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let cap_eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim().to_owned();
        let chown = u64::from_str_radix(&cap_eff, 16).unwrap() & (1 << CAP_CHOWN) != 0;
        match bind_socket(&config) {
            Ok(_) => println!("HELPER-RESULT chown={chown} ok"),
            Err(e) => println!("HELPER-RESULT chown={chown} err {e:#}"),
        }
    }

    /// This test binary as root without CAP_CHOWN (dropped from the bounding set, so that
    /// exec does not give it back), with group `gid` and supplementary `groups`, binding
    /// `socket` for `[control] group = control_gid`.
    fn bind_without_chown(gid: u32, groups: &[u32], control_gid: u32, socket: &Path) -> String {
        let groups: Vec<libc::gid_t> = groups.to_vec();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "control::server::tests::bind_without_chown_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_BIND, format!("{control_gid} {}", socket.display()))
        .stdin(Stdio::null());
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // system calls on memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_CAPBSET_DROP, CAP_CHOWN, 0, 0, 0) != 0
                    || libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .find_map(|l| l.split_once("HELPER-RESULT ").map(|(_, result)| result.to_owned()))
            .unwrap_or_else(|| panic!("the helper printed no result ({}): {stdout}", out.status))
    }

    /// The systemd unit drops CAP_CHOWN and runs the agent with `Group=aegis`: the control
    /// group still gets its socket (and the socket's new directory), with no chown at all;
    /// a member of the group by a supplementary group gets it by a chown the kernel allows
    /// without the capability; a group the agent is not in is an error saying what to do.
    #[test]
    fn a_control_group_works_without_cap_chown() {
        if !is_root() {
            return;
        }
        let dir = TempDir::new("nochown");
        let socket = dir.path().join("run/control.sock");
        assert_eq!(bind_without_chown(4242, &[], 4242, &socket), "chown=false ok");
        let meta = std::fs::symlink_metadata(&socket).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.uid(), meta.gid()), (0o660, 0, 4242));
        let parent = std::fs::metadata(socket.parent().unwrap()).unwrap();
        assert_eq!((parent.mode() & 0o777, parent.gid()), (0o750, 4242));

        let socket = dir.path().join("supplementary/control.sock");
        assert_eq!(bind_without_chown(0, &[4343], 4343, &socket), "chown=false ok");
        let meta = std::fs::symlink_metadata(&socket).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 4343));
        assert_eq!(std::fs::metadata(socket.parent().unwrap()).unwrap().gid(), 4343);

        let socket = dir.path().join("other/control.sock");
        let refused = bind_without_chown(4242, &[], 4444, &socket);
        assert!(
            refused.starts_with(&format!(
                "chown=false err cannot give {} to gid 4444 ([control] group): without CAP_CHOWN",
                socket.parent().unwrap().display()
            )) && refused.contains("the unit's Group="),
            "{refused}"
        );
        assert!(!socket.exists());
    }

    /// Run by `peer_credentials_are_checked` as another user: one status request.
    #[test]
    #[ignore = "helper, run by peer_credentials_are_checked as another user"]
    fn peer_client_helper() {
        let Ok(socket) = std::env::var(HELPER_SOCKET) else {
            return;
        };
        match call(Path::new(&socket), &Request::Status) {
            Ok(reply) => println!("HELPER-RESULT ok {}", encode_response(&Response::Ok(reply))),
            Err(e) => println!("HELPER-RESULT err {e}"),
        }
    }

    /// This test binary as `uid`/`gid` with supplementary `groups`, running the helper.
    fn client_as(uid: u32, gid: u32, groups: &[u32], socket: &Path) -> String {
        let groups: Vec<libc::gid_t> = groups.to_vec();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "control::server::tests::peer_client_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_SOCKET, socket)
        .stdin(Stdio::null());
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // system calls on memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .find_map(|l| l.split_once("HELPER-RESULT ").map(|(_, result)| result))
            .unwrap_or_else(|| {
                panic!(
                    "the helper printed no result ({}): {stdout} {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .to_owned()
    }

    #[test]
    fn peer_credentials_are_checked() {
        if !is_root() {
            return;
        }
        let dir = TempDir::new("peer");
        let config = ControlConfig { group: Some(4242), socket: dir.path().join("sock/control.sock"), ..config(&dir) };
        // A directory others can enter, so that only the socket's mode and the peer check decide.
        std::fs::create_dir_all(config.socket.parent().unwrap()).unwrap();
        let (server, _) = start(&config);
        let socket = server.socket();

        // Mode 0666 (a mistake, or a socket passed elsewhere): the peer check still refuses.
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        let nobody = client_as(65534, 65534, &[], socket);
        assert!(nobody.starts_with("err permission denied: nobody (uid 65534, pid "), "{nobody}");
        assert!(
            nobody.ends_with("is neither root nor a member of gid 4242: run as root or as a member of gid 4242"),
            "{nobody}"
        );
        // Members pass, by primary or by supplementary group.
        let primary = client_as(65534, 4242, &[], socket);
        assert!(primary.starts_with("ok {\"v\":1,\"status\":\"ok\",\"kind\":\"status\""), "{primary}");
        let supplementary = client_as(65534, 65534, &[4242], socket);
        assert!(supplementary.starts_with("ok "), "{supplementary}");

        // Mode 0660: the kernel refuses the connection, and the client says what to do.
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660)).unwrap();
        let denied = client_as(65534, 65534, &[], socket);
        assert_eq!(
            denied,
            format!(
                "err permission denied on {}: run as root or as a member of gid 4242 (after being added to a group, \
                 log in again)",
                socket.display()
            )
        );

        let refusals: Vec<_> =
            read_entries(&config.audit_log).unwrap().into_iter().filter(|e| e.action == AuditAction::Connect).collect();
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert_eq!(
            (refusals[0].actor.uid, refusals[0].actor.gid, refusals[0].result),
            (65534, 65534, Outcome::Refused)
        );
        assert!(refusals[0].message.as_deref().unwrap().contains("is neither root nor a member of gid 4242"));
    }

    #[test]
    fn peer_groups_of_a_socket_pair() {
        let (a, _b) = StdStream::pair().unwrap();
        let expected: Vec<u32> = nix::unistd::getgroups().unwrap().iter().map(|g| g.as_raw()).collect();
        assert_eq!(peer_groups(a.as_raw_fd()).unwrap(), expected);
    }

    #[test]
    fn proc_groups_fallback() {
        let me = nix::unistd::geteuid().as_raw();
        let groups = proc_groups(std::process::id(), me).unwrap();
        let expected: Vec<u32> = nix::unistd::getgroups().unwrap().iter().map(|g| g.as_raw()).collect();
        assert_eq!(groups, expected);
        assert_eq!(
            proc_groups(std::process::id(), me + 1),
            Err(format!(
                "permission denied: the client process {} changed identity while connecting",
                std::process::id()
            ))
        );
    }
}
