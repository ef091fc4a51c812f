//! The operator commands that talk to the running agent over its control socket:
//! `block`, `unblock`, `blocks`, `emergency`, `disable`, `enforce`, `status`.
//!
//! Exit status ([`EXIT_OK`] ...): 0 done; 1 the agent refused (its message on stderr); 3
//! the agent could not be asked (no socket — is it running? —, permission denied, no
//! answer); 64 bad arguments (clap's own, an invalid value, an unreadable `--config`).
//!
//! The socket: `--socket`, else the `[control] socket` of the file given with `--config`
//! (the agent's own config), else [`DEFAULT_SOCKET`].

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    clock::now_unix_ms,
    control::{
        BlockSpec, BlockTarget, ClientError, DEFAULT_SOCKET, Dest, Expiry, Reply, Request, Scope, call, parse_cgroup,
        parse_dest, parse_duration, parse_route,
        render::{blocks_json, mode_line, reply_text},
    },
};

pub const EXIT_OK: u8 = super::exit::OK;
/// The agent answered with an error.
pub const EXIT_REFUSED: u8 = super::exit::NO;
/// Bad arguments (clap's usage errors exit with it too, see `main`).
pub const EXIT_USAGE: u8 = super::exit::USAGE;
/// The agent could not be asked.
pub const EXIT_UNREACHABLE: u8 = super::exit::ERROR;

/// Where the agent's control socket is.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct SocketArgs {
    /// The agent's control socket [default: the --config file's [control] socket, or
    /// /run/aegis/control.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The agent's config file, to find its control socket (and its incidents).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The incident this change is for (block, unblock, disable, emergency, enforce): the
    /// change and what the agent answered (its validation: connections killed, kernel
    /// rules in force, or why it was refused) go into the incident's journal.
    #[arg(long, value_name = "ID")]
    pub incident: Option<String>,
}

/// The control subcommands (flattened into the agent's command line).
#[derive(Clone, Debug, PartialEq, Eq, clap::Subcommand)]
pub enum ControlCommand {
    /// Block a provider or a destination (calls and connects), host-wide or for a cgroup or
    /// an executable. Prints the block's id on stdout.
    Block(BlockArgs),
    /// Lift a block by id.
    Unblock {
        /// The block's id, as `block` printed it or `blocks` lists it.
        id: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// List the active blocks (who set them, when, why, scope, expiry, fallback), the
    /// emergency state and the enforcement mode.
    Blocks {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Emergency mode: every `warn` decision becomes `block`, host-wide or for a cgroup, and
    /// rule verdicts stop calls there even in observe mode.
    Emergency {
        #[arg(value_enum)]
        state: OnOff,
        /// Only for this cgroup and those below it: its cgroup v2 path as in /proc/PID/cgroup
        /// (/team-a), or its directory under the cgroup v2 mount (/sys/fs/cgroup/team-a).
        #[arg(long, value_name = "PATH", value_parser = parse_cgroup)]
        cgroup: Option<String>,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Disable a provider, a model, a route (HOST/PATH-PREFIX) or a tenant (a cgroup) for
    /// every caller. Prints the block's id on stdout.
    Disable(DisableArgs),
    /// Enforcement mode: `on` makes rule verdicts of block stop calls, `off` only records
    /// them (observe); `status` shows the mode and who set it. Kept across restarts until
    /// the config's enforce.mode is edited.
    Enforce {
        #[arg(value_enum)]
        state: EnforceState,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// The agent's version, pid, active blocks, emergency state, enforcement mode, and what
    /// each kernel capability (capture, destination blocks, connection kills, content gate)
    /// came to on this host: active, degraded, unavailable or off, with the reason.
    Status {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArgs,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EnforceState {
    /// Rule verdicts of block stop calls.
    On,
    /// Rule verdicts are recorded, not enforced (observe).
    Off,
    /// Show the mode, where it comes from, and what it means.
    Status,
}

#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["provider", "dest"])))]
pub struct BlockArgs {
    /// A provider, by the name the agent records (openai, anthropic, azure-openai, ...).
    #[arg(long, value_name = "NAME")]
    pub provider: Option<String>,
    /// A destination network, with a port or not (10.0.0.0/8:443, [2001:db8::/32]:443).
    #[arg(long, value_name = "ADDR[/PREFIX][:PORT]", value_parser = parse_dest)]
    pub dest: Option<Dest>,
    /// Only processes in this cgroup and below it: its cgroup v2 path as in /proc/PID/cgroup
    /// (/team-a), or its directory under the cgroup v2 mount (/sys/fs/cgroup/team-a).
    #[arg(long, value_name = "PATH", value_parser = parse_cgroup, conflicts_with = "exe")]
    pub cgroup: Option<String>,
    /// Only processes running this executable (absolute path; symlinks are resolved).
    #[arg(long, value_name = "PATH")]
    pub exe: Option<PathBuf>,
    /// Lift the block after this long (90s, 15m, 2h, 1d); default: never.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub expires: Option<Duration>,
    /// Redirect blocked connects to this endpoint, which speaks the same API, instead of
    /// refusing them.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_fallback)]
    pub fallback: Option<SocketAddr>,
    /// Why (one line; it goes into the audit log).
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct DisableArgs {
    /// What to disable.
    #[arg(value_enum)]
    pub kind: DisableKind,
    /// The provider or model name, HOST/PATH-PREFIX for a route, the cgroup for a tenant (its
    /// v2 path, or its directory under the cgroup v2 mount).
    #[arg(value_name = "NAME")]
    pub what: String,
    /// Enable it again after this long (90s, 15m, 2h, 1d); default: never.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub expires: Option<Duration>,
    /// Why (one line; it goes into the audit log).
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DisableKind {
    Provider,
    Model,
    Route,
    Tenant,
}

fn parse_fallback(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!("invalid fallback {s:?}: expected ADDR:PORT, e.g. 127.0.0.1:8443 or [::1]:8443 (no host names)")
    })
}

/// What a command printed and how it ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub code: u8,
    pub stdout: String,
    pub stderr: String,
}

impl ControlCommand {
    /// The subcommand's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Block(_) => "block",
            Self::Unblock { .. } => "unblock",
            Self::Blocks { .. } => "blocks",
            Self::Emergency { .. } => "emergency",
            Self::Disable(_) => "disable",
            Self::Enforce { .. } => "enforce",
            Self::Status { .. } => "status",
        }
    }

    fn socket_args(&self) -> &SocketArgs {
        match self {
            Self::Block(a) => &a.socket,
            Self::Disable(a) => &a.socket,
            Self::Unblock { socket, .. }
            | Self::Blocks { socket, .. }
            | Self::Emergency { socket, .. }
            | Self::Enforce { socket, .. }
            | Self::Status { socket, .. } => socket,
        }
    }

    /// The request this command sends; an error is a usage error (exit 64). The spec of a
    /// block is validated here with the agent's own rules, so that typing mistakes are
    /// told apart from refusals.
    pub fn request(&self) -> Result<Request, String> {
        Ok(match self {
            Self::Block(a) => {
                let target = match (&a.provider, a.dest) {
                    (Some(name), None) => BlockTarget::Provider(name.clone()),
                    (None, Some(dest)) => BlockTarget::Dest(dest),
                    _ => return Err("give one of --provider and --dest".into()),
                };
                let scope = match (&a.cgroup, &a.exe) {
                    (Some(c), _) => Scope::Cgroup(c.clone()),
                    (None, Some(exe)) => Scope::Exe(exe_path(exe)?),
                    (None, None) => Scope::Host,
                };
                let spec = BlockSpec {
                    target,
                    scope,
                    expires: a.expires.map(Expiry::after),
                    fallback: a.fallback,
                    reason: a.reason.clone(),
                };
                Request::Block(spec.validated()?)
            }
            Self::Disable(a) => {
                let target = match a.kind {
                    DisableKind::Provider => BlockTarget::Provider(a.what.clone()),
                    DisableKind::Model => BlockTarget::Model(a.what.clone()),
                    DisableKind::Route => parse_route(&a.what)?,
                    DisableKind::Tenant => BlockTarget::Tenant(parse_cgroup(&a.what)?),
                };
                let spec = BlockSpec {
                    target,
                    scope: Scope::Host,
                    expires: a.expires.map(Expiry::after),
                    fallback: None,
                    reason: a.reason.clone(),
                };
                Request::Block(spec.validated()?)
            }
            Self::Unblock { id, .. } => Request::Unblock { id: id.trim().to_owned() },
            Self::Blocks { .. } => Request::List,
            Self::Emergency { state, cgroup, .. } => {
                Request::Emergency { on: *state == OnOff::On, cgroup: cgroup.clone() }
            }
            Self::Enforce { state: EnforceState::Status, .. } | Self::Status { .. } => Request::Status,
            Self::Enforce { state, .. } => Request::Enforce { on: *state == EnforceState::On },
        })
    }

    /// What to print for the agent's `reply` (`now_ms`: for expiry times). `block` and
    /// `disable` print the id alone on stdout, for scripts, and the summary on stderr.
    pub fn output(&self, reply: &Reply, now_ms: u64) -> Outcome {
        let expected = match self {
            Self::Block(_) | Self::Disable(_) => matches!(reply, Reply::Blocked { .. }),
            Self::Unblock { .. } => matches!(reply, Reply::Unblocked { .. }),
            Self::Blocks { .. } => matches!(reply, Reply::Blocks { .. }),
            Self::Emergency { .. } => matches!(reply, Reply::Emergency { .. }),
            Self::Enforce { state: EnforceState::Status, .. } => {
                matches!(reply, Reply::Status(s) if s.mode.is_some())
            }
            Self::Enforce { .. } => matches!(reply, Reply::Enforce { .. }),
            Self::Status { .. } => matches!(reply, Reply::Status(_)),
        };
        if !expected {
            return unexpected(self, reply);
        }
        match (self, reply) {
            (Self::Block(_) | Self::Disable(_), Reply::Blocked { block, .. }) => {
                Outcome { code: EXIT_OK, stdout: format!("{}\n", block.id), stderr: reply_text(reply, now_ms) }
            }
            (Self::Blocks { json: true, .. }, Reply::Blocks { blocks, emergency, mode }) => {
                Outcome { code: EXIT_OK, stdout: blocks_json(blocks, emergency, mode.as_ref()), stderr: String::new() }
            }
            (Self::Enforce { state: EnforceState::Status, .. }, Reply::Status(status)) => {
                let line = status.mode.as_ref().map(mode_line).unwrap_or_default();
                Outcome { code: EXIT_OK, stdout: format!("{line}\n"), stderr: String::new() }
            }
            (Self::Status { json: true, .. }, Reply::Status(status)) => {
                let mut json = serde_json::to_string_pretty(status).expect("the status serializes");
                json.push('\n');
                Outcome { code: EXIT_OK, stdout: json, stderr: String::new() }
            }
            _ => Outcome { code: EXIT_OK, stdout: reply_text(reply, now_ms), stderr: String::new() },
        }
    }

    /// Send the request to the agent at `socket`; what to print and the exit status.
    pub fn execute(&self, socket: &Path) -> Outcome {
        let req = match self.request() {
            Ok(r) => r,
            Err(e) => return self.failure(EXIT_USAGE, &e),
        };
        match call(socket, &req) {
            Ok(reply) => self.output(&reply, now_unix_ms()),
            Err(e) => self.failure(exit_code(&e), &e.to_string()),
        }
    }

    fn failure(&self, code: u8, message: &str) -> Outcome {
        Outcome { code, stdout: String::new(), stderr: format!("aegis-agent {}: {message}\n", self.name()) }
    }
}

fn unexpected(cmd: &ControlCommand, reply: &Reply) -> Outcome {
    if let (ControlCommand::Enforce { state: EnforceState::Status, .. }, Reply::Status(_)) = (cmd, reply) {
        let message = "the agent reports no enforcement mode: it is older than this client; restart it with this \
                       version";
        return cmd.failure(EXIT_UNREACHABLE, message);
    }
    let kind = serde_json::to_value(reply).ok().and_then(|v| v["kind"].as_str().map(str::to_owned));
    let message = format!(
        "unexpected answer from the agent: {} (use the aegis-agent binary of the agent's version)",
        kind.as_deref().unwrap_or("unknown")
    );
    cmd.failure(EXIT_UNREACHABLE, &message)
}

/// The exit status for a failed request: 1 when the agent refused, 3 when it could not be
/// asked.
pub fn exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Refused(_) => EXIT_REFUSED,
        ClientError::NotRunning { .. }
        | ClientError::PermissionDenied { .. }
        | ClientError::TimedOut { .. }
        | ClientError::Io { .. }
        | ClientError::Protocol(_) => EXIT_UNREACHABLE,
    }
}

/// An `--exe` path: absolute, with symlinks resolved when it exists (the agent compares
/// it with `/proc/PID/exe`, which has them resolved).
fn exe_path(p: &Path) -> Result<PathBuf, String> {
    if !p.is_absolute() {
        return Err(format!(
            "--exe {}: give the executable's absolute path (e.g. /usr/bin/python3; `command -v NAME` finds it)",
            p.display()
        ));
    }
    Ok(std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned()))
}

/// The control socket: `--socket`, else `--config`'s `[control] socket`, else the default.
pub fn socket_path(args: &SocketArgs) -> Result<PathBuf, String> {
    if let Some(s) = &args.socket {
        return Ok(s.clone());
    }
    let Some(config) = &args.config else { return Ok(DEFAULT_SOCKET.into()) };
    let text =
        crate::config::read_file(config).map_err(|e| format!("{e:#} (give the socket with --socket PATH instead)"))?;
    socket_from_config(&text)
        .map(|s| s.unwrap_or_else(|| DEFAULT_SOCKET.into()))
        .map_err(|e| format!("invalid config file {}: {e}", config.display()))
}

/// The `[control] socket` of an agent config text, when it has one.
fn socket_from_config(text: &str) -> Result<Option<PathBuf>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.message().to_owned())?;
    match table.get("control").and_then(|c| c.get("socket")) {
        None => Ok(None),
        Some(toml::Value::String(s)) if !s.is_empty() => Ok(Some(PathBuf::from(s))),
        Some(_) => Err("control.socket must be a path (a non-empty string)".into()),
    }
}

/// Run `cmd`: print its output and return its exit status.
pub fn run(cmd: &ControlCommand) -> u8 {
    let mut outcome = match socket_path(cmd.socket_args()) {
        Ok(socket) => cmd.execute(&socket),
        Err(e) => cmd.failure(EXIT_USAGE, &e),
    };
    if let Some(id) = &cmd.socket_args().incident
        && let Err(e) = record_for_incident(cmd, id, &outcome)
    {
        outcome.stderr += &format!("aegis-agent: the change is not in incident {id}'s journal: {e:#}\n");
        outcome.code = outcome.code.max(EXIT_REFUSED);
    }
    print!("{}", outcome.stdout);
    eprint!("{}", outcome.stderr);
    outcome.code
}

/// Keep `cmd` and its outcome in incident `id`'s journal.
fn record_for_incident(cmd: &ControlCommand, id: &str, outcome: &Outcome) -> anyhow::Result<()> {
    use crate::evidence::incident::{Store, What, operator};
    anyhow::ensure!(
        matches!(
            cmd,
            ControlCommand::Block(_)
                | ControlCommand::Unblock { .. }
                | ControlCommand::Disable(_)
                | ControlCommand::Emergency { .. }
                | ControlCommand::Enforce { .. }
        ),
        "--incident goes with block, unblock, disable, emergency and enforce"
    );
    let config = match &cmd.socket_args().config {
        Some(p) => crate::config::Config::load(p)?,
        None => crate::config::Config::defaults(),
    };
    let request = cmd.request().map(|r| serde_json::to_value(r).unwrap_or_default()).unwrap_or_default();
    let result = format!("{}{}", outcome.stdout, outcome.stderr).trim().to_owned();
    Store::open(&config.incidents.dir)?.record(
        &operator(),
        id,
        What::Containment { action: cmd.name().to_owned(), request, exit_code: outcome.code, result },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use clap::Parser as _;

    use super::*;
    use crate::control::{
        ControlConfig, ControlServer, Emergency, EnforceMode, NoopHandler, ServerHandle, testutil::TempDir,
    };

    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: ControlCommand,
    }

    fn parse(args: &[&str]) -> Result<ControlCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("aegis-agent").chain(args.iter().copied())).map(|c| c.command)
    }

    fn request(args: &[&str]) -> Result<Request, String> {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}")).request()
    }

    fn usage_error(args: &[&str]) -> clap::Error {
        match parse(args) {
            Err(e) => e,
            Ok(c) => panic!("{args:?} parsed: {c:?}"),
        }
    }

    fn spec(target: BlockTarget, scope: Scope, expires: Option<u64>, fallback: Option<&str>, reason: &str) -> Request {
        Request::Block(BlockSpec {
            target,
            scope,
            expires: expires.map(Expiry::AfterSecs),
            fallback: fallback.map(|f| f.parse().unwrap()),
            reason: reason.into(),
        })
    }

    #[test]
    fn arguments_to_requests() {
        assert_eq!(
            request(&["block", "--provider", "OpenAI", "--expires", "15m", "--reason", " incident 42 "]),
            Ok(spec(BlockTarget::Provider("openai".into()), Scope::Host, Some(900), None, "incident 42"))
        );
        assert_eq!(
            request(&[
                "block",
                "--dest",
                "10.0.0.0/8:443",
                "--cgroup",
                "/team-a/",
                "--fallback",
                "127.0.0.1:8443",
                "--reason",
                "r",
            ]),
            Ok(spec(
                BlockTarget::Dest(parse_dest("10.0.0.0/8:443").unwrap()),
                Scope::Cgroup("/team-a".into()),
                None,
                Some("127.0.0.1:8443"),
                "r"
            ))
        );
        assert_eq!(
            request(&["block", "--provider", "anthropic", "--exe", "/nonexistent/bin/agent", "--reason", "r"]),
            Ok(spec(
                BlockTarget::Provider("anthropic".into()),
                Scope::Exe("/nonexistent/bin/agent".into()),
                None,
                None,
                "r"
            ))
        );
        // Symlinks resolved: the agent sees /proc/PID/exe.
        let dir = TempDir::new("exe");
        let real = dir.path().join("python3.11");
        std::fs::write(&real, "").unwrap();
        let link = dir.path().join("python3");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let Ok(Request::Block(s)) =
            request(&["block", "--provider", "x", "--exe", link.to_str().unwrap(), "--reason", "r"])
        else {
            panic!()
        };
        assert_eq!(s.scope, Scope::Exe(std::fs::canonicalize(&real).unwrap()));

        assert_eq!(
            request(&["disable", "provider", "groq", "--reason", "r"]),
            Ok(spec(BlockTarget::Provider("groq".into()), Scope::Host, None, None, "r"))
        );
        assert_eq!(
            request(&["disable", "model", "gpt-4o", "--expires", "2h", "--reason", "r"]),
            Ok(spec(BlockTarget::Model("gpt-4o".into()), Scope::Host, Some(7200), None, "r"))
        );
        assert_eq!(
            request(&["disable", "route", "https://API.openai.com/v1/chat", "--reason", "r"]),
            Ok(spec(
                BlockTarget::Route { host: "api.openai.com".into(), path_prefix: "/v1/chat".into() },
                Scope::Host,
                None,
                None,
                "r"
            ))
        );
        assert_eq!(
            request(&["disable", "tenant", "/team-a/", "--reason", "r"]),
            Ok(spec(BlockTarget::Tenant("/team-a".into()), Scope::Host, None, None, "r"))
        );
        assert_eq!(request(&["unblock", "blk-0000002a"]), Ok(Request::Unblock { id: "blk-0000002a".into() }));
        assert_eq!(request(&["blocks", "--json"]), Ok(Request::List));
        assert_eq!(request(&["blocks"]), Ok(Request::List));
        assert_eq!(request(&["status"]), Ok(Request::Status));
        assert_eq!(request(&["status", "--json"]), Ok(Request::Status));
        assert_eq!(request(&["enforce", "on"]), Ok(Request::Enforce { on: true }));
        assert_eq!(request(&["enforce", "off"]), Ok(Request::Enforce { on: false }));
        assert_eq!(request(&["enforce", "status"]), Ok(Request::Status));
        assert_eq!(request(&["emergency", "on"]), Ok(Request::Emergency { on: true, cgroup: None }));
        assert_eq!(
            request(&["emergency", "off", "--cgroup", "/team-a"]),
            Ok(Request::Emergency { on: false, cgroup: Some("/team-a".into()) })
        );
        // The cgroup's directory under this host's cgroup v2 mount is its v2 path.
        if let Some(root) = crate::cgroup::Mounts::of_this_host().v2 {
            let fs_path = format!("{root}/team-a/");
            assert_eq!(
                request(&["emergency", "on", "--cgroup", &fs_path]),
                Ok(Request::Emergency { on: true, cgroup: Some("/team-a".into()) })
            );
            assert_eq!(
                request(&["disable", "tenant", &fs_path, "--reason", "r"]),
                Ok(spec(BlockTarget::Tenant("/team-a".into()), Scope::Host, None, None, "r"))
            );
            let Ok(Request::Block(s)) = request(&["block", "--provider", "x", "--cgroup", &fs_path, "--reason", "r"])
            else {
                panic!()
            };
            assert_eq!(s.scope, Scope::Cgroup("/team-a".into()));
        }
        let with_socket = parse(&["blocks", "--socket", "/tmp/s.sock", "--json"]).unwrap();
        assert_eq!(
            with_socket.socket_args(),
            &SocketArgs { socket: Some("/tmp/s.sock".into()), config: None, incident: None }
        );
    }

    #[test]
    fn usage_errors() {
        use clap::error::ErrorKind;
        for (args, kind) in [
            (&["block", "--reason", "r"][..], ErrorKind::MissingRequiredArgument),
            (&["block", "--provider", "openai"], ErrorKind::MissingRequiredArgument),
            (&["block", "--provider", "openai", "--dest", "10.0.0.1", "--reason", "r"], ErrorKind::ArgumentConflict),
            (
                &["block", "--provider", "p", "--cgroup", "/a", "--exe", "/b", "--reason", "r"],
                ErrorKind::ArgumentConflict,
            ),
            (&["block", "--dest", "api.openai.com", "--reason", "r"], ErrorKind::ValueValidation),
            (&["block", "--provider", "p", "--expires", "1.5h", "--reason", "r"], ErrorKind::ValueValidation),
            (
                &["block", "--provider", "p", "--fallback", "localhost:8443", "--reason", "r"],
                ErrorKind::ValueValidation,
            ),
            (&["block", "--provider", "p", "--cgroup", "team-a", "--reason", "r"], ErrorKind::ValueValidation),
            (&["emergency", "maybe"], ErrorKind::InvalidValue),
            (&["enforce", "maybe"], ErrorKind::InvalidValue),
            (&["enforce"], ErrorKind::MissingRequiredArgument),
            (&["disable", "host", "x", "--reason", "r"], ErrorKind::InvalidValue),
            (&["disable", "model", "--reason", "r"], ErrorKind::MissingRequiredArgument),
            (&["unblock"], ErrorKind::MissingRequiredArgument),
        ] {
            let e = usage_error(args);
            assert_eq!(e.kind(), kind, "{args:?}: {e}");
            assert!(e.use_stderr(), "{args:?}: a usage error, which main exits with EXIT_USAGE");
        }
        let e = usage_error(&["block", "--dest", "api.openai.com", "--reason", "r"]).to_string();
        assert!(e.contains("\"api.openai.com\" is not an IP address (host names are not accepted)"), "{e}");
        let e = usage_error(&["block", "--provider", "p", "--fallback", "localhost:8443", "--reason", "r"]).to_string();
        assert!(e.contains("expected ADDR:PORT, e.g. 127.0.0.1:8443 or [::1]:8443 (no host names)"), "{e}");

        // Values only the agent's rules can judge: refused before anything is sent.
        assert_eq!(
            request(&["block", "--provider", "open/ai", "--reason", "r"]),
            Err("provider name \"open/ai\" may only contain letters, digits, '.', '_' and '-' (e.g. openai, anthropic, \
                 azure_openai)"
                .into())
        );
        assert_eq!(
            request(&["block", "--provider", "p", "--exe", "python3", "--reason", "r"]),
            Err("--exe python3: give the executable's absolute path (e.g. /usr/bin/python3; `command -v NAME` finds it)"
                .into())
        );
        assert_eq!(
            request(&["block", "--provider", "p", "--reason", " "]),
            Err("the reason is empty: give one line saying why (it goes into the audit log)".into())
        );
        assert_eq!(
            request(&["block", "--dest", "10.0.0.0/8", "--fallback", "10.0.0.9:443", "--reason", "r"]),
            Err("fallback 10.0.0.9:443 is inside the blocked destination 10.0.0.0/8: connects to it would be blocked \
                 too"
            .into())
        );
        assert!(request(&["disable", "route", "/v1/chat", "--reason", "r"]).unwrap_err().contains("no host"));
        assert!(request(&["disable", "tenant", "team-a", "--reason", "r"]).unwrap_err().contains("must be absolute"));
    }

    #[test]
    fn exit_codes() {
        let path = PathBuf::from("/run/x.sock");
        assert_eq!(exit_code(&ClientError::Refused("no".into())), EXIT_REFUSED);
        assert_eq!(exit_code(&ClientError::NotRunning { path: path.clone(), reason: "r".into() }), EXIT_UNREACHABLE);
        assert_eq!(
            exit_code(&ClientError::PermissionDenied { path: path.clone(), hint: "h".into() }),
            EXIT_UNREACHABLE
        );
        assert_eq!(exit_code(&ClientError::TimedOut { path }), EXIT_UNREACHABLE);
        assert_eq!(exit_code(&ClientError::Protocol("p".into())), EXIT_UNREACHABLE);

        let blocks = parse(&["blocks"]).unwrap();
        let wrong = blocks.output(
            &Reply::Status(crate::control::AgentStatus {
                agent_version: "0".into(),
                protocol: 1,
                pid: 1,
                started_at: "x".into(),
                blocks: 0,
                emergency: Emergency::default(),
                kernel: String::new(),
                capabilities: vec![],
                mode: None,
                fleet: None,
                capture: None,
            }),
            0,
        );
        assert_eq!(wrong.code, EXIT_UNREACHABLE);
        assert_eq!(
            wrong.stderr,
            "aegis-agent blocks: unexpected answer from the agent: status (use the aegis-agent binary of the agent's \
             version)\n"
        );
        // `enforce status` against an agent that does not report its mode.
        let old = parse(&["enforce", "status"]).unwrap().output(
            &Reply::Status(crate::control::AgentStatus {
                agent_version: "0".into(),
                protocol: 1,
                pid: 1,
                started_at: "x".into(),
                blocks: 0,
                emergency: Emergency::default(),
                mode: None,
                kernel: String::new(),
                capabilities: vec![],
                fleet: None,
                capture: None,
            }),
            0,
        );
        assert_eq!(
            (old.code, old.stderr.as_str()),
            (
                EXIT_UNREACHABLE,
                "aegis-agent enforce: the agent reports no enforcement mode: it is older than this client; restart it \
                 with this version\n"
            )
        );
    }

    #[test]
    fn socket_from_args_or_config() {
        let dir = TempDir::new("sockcfg");
        let with = dir.path().join("with.toml");
        std::fs::write(&with, "[output]\nstdout = false\n[control]\nsocket = \"/run/custom/agent.sock\"\n").unwrap();
        let without = dir.path().join("without.toml");
        std::fs::write(&without, "[output]\nstdout = false\n").unwrap();
        let args = |socket: Option<&str>, config: Option<&Path>| SocketArgs {
            socket: socket.map(PathBuf::from),
            config: config.map(Path::to_owned),
            incident: None,
        };
        assert_eq!(socket_path(&args(None, None)), Ok(PathBuf::from(DEFAULT_SOCKET)));
        assert_eq!(socket_path(&args(None, Some(&with))), Ok(PathBuf::from("/run/custom/agent.sock")));
        assert_eq!(socket_path(&args(Some("/tmp/a.sock"), Some(&with))), Ok(PathBuf::from("/tmp/a.sock")));
        assert_eq!(socket_path(&args(None, Some(&without))), Ok(PathBuf::from(DEFAULT_SOCKET)));
        let missing = dir.path().join("missing.toml");
        let e = socket_path(&args(None, Some(&missing))).unwrap_err();
        assert!(e.starts_with(&format!("cannot read config file {}: ", missing.display())), "{e}");
        assert!(e.ends_with("(give the socket with --socket PATH instead)"), "{e}");
        // Not a regular file: refused at once, not read until memory runs out.
        let e = socket_path(&args(None, Some(Path::new("/dev/zero")))).unwrap_err();
        assert!(e.contains("/dev/zero: it is a character device, not a regular file"), "{e}");
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[control]\nsocket = 5\n").unwrap();
        assert_eq!(
            socket_path(&args(None, Some(&bad))),
            Err(format!("invalid config file {}: control.socket must be a path (a non-empty string)", bad.display()))
        );
    }

    fn server(dir: &TempDir) -> ServerHandle {
        let config = ControlConfig {
            socket: dir.path().join("run/control.sock"),
            state_file: dir.path().join("lib/blocks.json"),
            audit_log: dir.path().join("log/audit.jsonl"),
            ..ControlConfig::default()
        };
        ControlServer::start(config, EnforceMode::Observe, Arc::new(NoopHandler)).unwrap()
    }

    fn exec(socket: &Path, args: &[&str]) -> Outcome {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}")).execute(socket)
    }

    #[test]
    fn against_a_live_control_server() {
        let dir = TempDir::new("cli");
        let server = server(&dir);
        let socket = server.socket().to_owned();

        let out = exec(
            &socket,
            &["block", "--provider", "openai", "--fallback", "127.0.0.1:8443", "--reason", "incident 42"],
        );
        assert_eq!(out.code, EXIT_OK, "{out:?}");
        let id = out.stdout.strip_suffix('\n').unwrap();
        assert!(id.starts_with("blk-") && id.len() == 12 && !id.contains('\n'), "{out:?}");
        assert!(
            out.stderr.starts_with(&format!(
                "{id}: blocked provider openai (host), connects redirected to 127.0.0.1:8443, expires never; "
            )),
            "{out:?}"
        );

        let out = exec(&socket, &["disable", "model", "gpt-4o", "--expires", "1h", "--reason", "too costly"]);
        assert_eq!(out.code, EXIT_OK, "{out:?}");
        let model_id = out.stdout.trim_end().to_owned();

        let table = exec(&socket, &["blocks"]);
        assert_eq!(table.code, EXIT_OK);
        let lines: Vec<&str> = table.stdout.lines().collect();
        assert!(lines[0].starts_with("enforcement mode: observe (the config's enforce.mode); "), "{}", table.stdout);
        assert_eq!(lines[1], "emergency mode: off");
        assert!(lines[2].starts_with("ID") && lines[2].contains("FALLBACK"), "{}", table.stdout);
        assert!(lines[3].starts_with(id) && lines[3].contains("127.0.0.1:8443") && lines[3].ends_with("incident 42"));
        assert!(lines[4].starts_with(&model_id) && lines[4].contains("in 1h") && lines[4].ends_with("too costly"));

        let json = exec(&socket, &["blocks", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
        assert_eq!(v["mode"]["mode"], "observe");
        assert_eq!(v["blocks"][0]["id"], id);
        assert_eq!(v["blocks"][0]["spec"]["fallback"], "127.0.0.1:8443");
        assert_eq!(v["blocks"][1]["spec"]["target"]["model"], "gpt-4o");

        // Refusals: exit 1, the agent's message on stderr.
        let dup = exec(&socket, &["disable", "provider", "openai", "--reason", "again"]);
        assert_eq!(
            dup,
            Outcome {
                code: EXIT_REFUSED,
                stdout: String::new(),
                stderr: format!(
                    "aegis-agent disable: provider openai is already blocked (host) by {id}: unblock it first to \
                     change it\n"
                ),
            }
        );
        // A fallback on a block decided call by call: the agent refuses it too.
        let raw = Request::Block(BlockSpec {
            target: BlockTarget::Model("gpt-4o-mini".into()),
            scope: Scope::Host,
            expires: None,
            fallback: Some("127.0.0.1:8443".parse().unwrap()),
            reason: "r".into(),
        });
        match call(&socket, &raw) {
            Err(ClientError::Refused(m)) => {
                assert!(m.starts_with("a fallback applies only to provider and dest"), "{m}")
            }
            other => panic!("{other:?}"),
        }

        let on = exec(&socket, &["emergency", "on", "--cgroup", "/team-a"]);
        assert_eq!(
            (on.code, on.stdout.as_str()),
            (EXIT_OK, "emergency mode on for cgroups /team-a; killed 0 connections\n")
        );
        let status = exec(&socket, &["status"]);
        assert_eq!(status.code, EXIT_OK);
        assert!(
            status.stdout.contains(
                "; 2 active blocks; emergency mode on for cgroups /team-a; enforcement mode observe (the config's \
                 enforce.mode)\n"
            ),
            "{status:?}"
        );

        // The enforcement mode: on, already on, status (text and JSON), off.
        let mode = exec(&socket, &["enforce", "status"]);
        assert_eq!(
            (mode.code, mode.stdout.as_str()),
            (
                EXIT_OK,
                "enforcement mode: observe (the config's enforce.mode); rule verdicts are recorded, not enforced \
                 (operator blocks, disables and emergency mode still act)\n"
            )
        );
        let on = exec(&socket, &["enforce", "on"]);
        assert_eq!(on.code, EXIT_OK, "{on:?}");
        assert!(on.stdout.starts_with("enforcement mode: enforce (set by "), "{on:?}");
        assert!(on.stdout.ends_with("; the config says observe); rule verdicts of block stop calls\n"), "{on:?}");
        let again = exec(&socket, &["enforce", "on"]);
        assert!(again.stdout.ends_with("; the enforcement mode was already enforce\n"), "{again:?}");
        assert_eq!(exec(&socket, &["enforce", "status"]).stdout, on.stdout);
        let json = exec(&socket, &["status", "--json"]);
        assert_eq!(json.code, EXIT_OK, "{json:?}");
        let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
        assert_eq!((v["mode"]["mode"].as_str(), v["mode"]["configured"].as_str()), (Some("enforce"), Some("observe")));
        assert_eq!(v["mode"]["operator"]["set_by"]["pid"], std::process::id());
        assert_eq!(v["blocks"], 2);
        let off = exec(&socket, &["enforce", "off"]);
        assert!(off.stdout.starts_with("enforcement mode: observe (set by "), "{off:?}");

        let out = exec(&socket, &["unblock", id]);
        assert_eq!(out.code, EXIT_OK, "{out:?}");
        assert!(out.stdout.starts_with(&format!("{id}: unblocked provider openai (host)")), "{out:?}");
        let again = exec(&socket, &["unblock", id]);
        assert_eq!(again.code, EXIT_REFUSED);
        assert_eq!(
            again.stderr,
            format!("aegis-agent unblock: no active block {id}: `aegis-agent blocks` lists the active ones\n")
        );

        // Usage errors found before sending: exit 2, nothing sent.
        let bad = exec(&socket, &["block", "--provider", "p", "--exe", "python3", "--reason", "r"]);
        assert_eq!(bad.code, EXIT_USAGE);
        assert!(bad.stderr.starts_with("aegis-agent block: --exe python3: "), "{bad:?}");

        server.shutdown();
        let gone = exec(&socket, &["blocks"]);
        assert_eq!(gone.code, EXIT_UNREACHABLE);
        assert!(gone.stderr.contains("no control socket there; is the agent running?"), "{gone:?}");
    }
}
