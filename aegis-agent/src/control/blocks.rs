//! The block model: what an operator blocks ([`BlockTarget`]), where ([`Scope`]), for how
//! long ([`Expiry`]), who set it and why ([`Block`]); the table of active blocks with
//! expiry ([`BlockTable`]); the emergency switch ([`Emergency`]); their persisted form,
//! with the operator's enforcement mode ([`ControlState`]); the parsers for the command-line forms ([`parse_dest`],
//! [`parse_duration`], [`parse_route`], [`parse_cgroup`]); and the matching of a call or a
//! connection against the table ([`Subject`]).
//!
//! Every text an operator gives is validated before it enters the table (no control
//! characters, bounded lengths): blocks are printed on other operators' terminals and
//! written to the audit log, so they must not carry escape sequences or forged lines.
//!
//! No two active blocks have the same target and scope: the kernel side keys its maps by
//! that pair, and removing one of two duplicates would otherwise lift an entry that the
//! other still claims.

use std::{
    collections::{BTreeSet, hash_map::RandomState},
    fmt,
    hash::BuildHasher,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::mode::{ModeChoice, ModeState};
use crate::{
    clock::rfc3339_ms,
    net::{IpNet, has_port, mask, max_prefix, strip_port},
};

/// Longest reason accepted, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;
/// Longest name (provider, model, host, path, cgroup, executable) accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 512;
/// Furthest expiry accepted: ten years (leave the expiry out for a block that never ends).
pub const MAX_EXPIRY_SECS: u64 = 10 * 365 * 86_400;
/// Version of the state file format written by [`ControlState::save`].
pub const STATE_VERSION: u32 = 1;
/// Largest state file read: [`super::server::MAX_BLOCKS`] blocks of at most about 6 KiB
/// (reason and names at their longest, JSON-escaped) fit with room to spare.
pub const MAX_STATE_FILE_BYTES: u64 = 128 << 20;

/// What a block stops.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockTarget {
    /// Every call to a provider, by the name the agent records (`openai`, `anthropic`, ...).
    Provider(String),
    /// Every connection to a network (and port).
    Dest(Dest),
    /// Calls asking for this model (exact name, as sent in the request).
    Model(String),
    /// Calls to a host whose path starts with `path_prefix`.
    Route { host: String, path_prefix: String },
    /// Every call from a cgroup and the cgroups below it.
    Tenant(String),
}

/// A destination network: `net/prefix`, optionally one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Dest {
    pub net: IpAddr,
    pub prefix: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// Where a block applies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every process on the host.
    #[default]
    Host,
    /// Processes in this cgroup (v2 path, as in `/proc/PID/cgroup`) and below it.
    Cgroup(String),
    /// Processes running this executable.
    Exe(PathBuf),
}

/// When a block ends, as asked for; resolved to [`Block::expires_unix_ms`] when it is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expiry {
    /// This many seconds after the block is set.
    AfterSecs(u64),
    /// At this Unix time, in seconds.
    AtUnix(u64),
}

/// A block as an operator asks for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSpec {
    pub target: BlockTarget,
    #[serde(default)]
    pub scope: Scope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Expiry>,
    /// Where blocked connects go instead of failing: an endpoint speaking the same API (a
    /// local gateway, a self-hosted model). The kernel rewrites the connect's destination,
    /// so only provider and dest blocks, which are enforced on connects, take one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<SocketAddr>,
    pub reason: String,
}

/// Who made a change: the peer credentials of the control client (or the agent itself,
/// for expiry and restore).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// The process name (`/proc/PID/comm`) when the client connected.
    pub comm: String,
    /// The user name of `uid`, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// An active block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// `blk-` and 8 hex digits, unique among the active blocks.
    pub id: String,
    pub spec: BlockSpec,
    pub created_by: Actor,
    /// RFC 3339 UTC.
    pub created_at: String,
    pub created_unix_ms: u64,
    /// RFC 3339 UTC; absent: the block never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
    /// Set by this version of the fleet's policy (None: by an operator on this host). The
    /// fleet's next policy replaces the fleet's blocks and leaves the operator's alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_version: Option<u64>,
}

/// What a block is matched against: the facts known about a call or a connection. Facts
/// left `None` match no block that needs them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Subject<'a> {
    pub provider: Option<&'a str>,
    pub model: Option<&'a str>,
    /// The `Host` of the request, with or without a port.
    pub host: Option<&'a str>,
    /// The request path (a query string is fine).
    pub path: Option<&'a str>,
    pub peer: Option<SocketAddr>,
    pub cgroup: Option<&'a str>,
    pub exe: Option<&'a Path>,
}

/// The active blocks, in the order they were set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlockTable {
    blocks: Vec<Block>,
}

/// Emergency mode: every `warn` decision becomes `block`, host-wide or for some cgroups
/// (and the cgroups below them). Each switch is independent: turning host-wide mode off
/// leaves the cgroups that are on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Emergency {
    pub host: bool,
    #[serde(default)]
    pub cgroups: BTreeSet<String>,
}

/// Everything the control plane keeps across restarts, and the enforcement mode in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    pub blocks: BlockTable,
    pub emergency: Emergency,
    /// Only the operator's choice is saved; the config's part is set at start
    /// ([`ModeState::at_start`]).
    #[serde(default)]
    pub mode: ModeState,
}

// ---------------------------------------------------------------------------------------
// Parsers for the command-line forms

const DURATION_HINT: &str = "expected a whole number followed by s, m, h or d, e.g. 90s, 15m, 2h, 1d";

/// Parse a block duration: a whole number and a unit, `s`, `m`, `h` or `d` (`90s`, `15m`,
/// `2h`, `1d`). More than zero, at most ten years.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    if num.is_empty() {
        return Err(format!("invalid duration {s:?}: {DURATION_HINT}"));
    }
    let unit_secs: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "" => return Err(format!("invalid duration {s:?}: missing unit; {DURATION_HINT}")),
        u if u.starts_with('.') => {
            return Err(format!(
                "invalid duration {s:?}: fractions are not supported; use a smaller unit (90m, not 1.5h)"
            ));
        }
        u => return Err(format!("invalid duration {s:?}: unknown unit {u:?}; {DURATION_HINT}")),
    };
    let secs = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_secs))
        .filter(|&secs| secs <= MAX_EXPIRY_SECS)
        .ok_or_else(|| format!("invalid duration {s:?}: more than ten years"))?;
    if secs == 0 {
        return Err(format!("invalid duration {s:?}: must be more than zero"));
    }
    Ok(Duration::from_secs(secs))
}

/// Parse a destination: `ADDR[/PREFIX][:PORT]`; an IPv6 address with a port goes in
/// brackets (`[2001:db8::/32]:443` or `[2001:db8::]/32:443`). No host names: a name
/// resolves to many addresses, and to different ones over time.
pub fn parse_dest(s: &str) -> Result<Dest, String> {
    let bad = |why: String| {
        format!(
            "invalid destination {s:?}: {why}; expected ADDR[/PREFIX][:PORT], e.g. 10.0.0.0/8:443, \
             203.0.113.7, [2001:db8::/32]:443"
        )
    };
    let t = s.trim();
    let (addr, prefix, port) = if let Some(rest) = t.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(|| bad("missing ']'".into()))?;
        let (addr, inner_prefix) = split_prefix(inside);
        let (outer_prefix, port) = if let Some(p) = after.strip_prefix('/') {
            match p.split_once(':') {
                Some((p, port)) => (Some(p), Some(port)),
                None => (Some(p), None),
            }
        } else if let Some(port) = after.strip_prefix(':') {
            (None, Some(port))
        } else if after.is_empty() {
            (None, None)
        } else {
            return Err(bad(format!("unexpected {after:?} after ']'")));
        };
        if inner_prefix.is_some() && outer_prefix.is_some() {
            return Err(bad("two prefixes".into()));
        }
        (addr, inner_prefix.or(outer_prefix), port)
    } else if t.matches(':').count() >= 2 {
        let (addr, prefix) = split_prefix(t);
        (addr, prefix, None)
    } else {
        let (rest, port) = match t.rsplit_once(':') {
            Some((rest, port)) => (rest, Some(port)),
            None => (t, None),
        };
        let (addr, prefix) = split_prefix(rest);
        (addr, prefix, port)
    };
    let net: IpAddr = addr.parse().map_err(|_| {
        if addr.is_empty() {
            bad("no address".into())
        } else {
            bad(format!("{addr:?} is not an IP address (host names are not accepted)"))
        }
    })?;
    let max = max_prefix(net);
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= max => p,
            _ => return Err(bad(format!("prefix /{p} is not a number from 0 to {max}"))),
        },
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => return Err(bad(format!("port {p:?} is not a number from 1 to 65535"))),
        },
    };
    let masked = mask(net, prefix);
    if masked != net {
        return Err(bad(format!("{net}/{prefix} has host bits set (did you mean {masked}/{prefix}?)")));
    }
    Ok(Dest { net, prefix, port })
}

fn split_prefix(s: &str) -> (&str, Option<&str>) {
    match s.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (s, None),
    }
}

/// Parse a route: `HOST[/PATH-PREFIX]` (an `https://` or `http://` in front is dropped);
/// no path prefix: every path.
pub fn parse_route(s: &str) -> Result<BlockTarget, String> {
    let t = s.trim();
    let t = t.strip_prefix("https://").or_else(|| t.strip_prefix("http://")).unwrap_or(t);
    let (host, path) = match t.find('/') {
        Some(i) => t.split_at(i),
        None => (t, "/"),
    };
    if host.is_empty() {
        return Err(format!(
            "invalid route {s:?}: no host; expected HOST/PATH-PREFIX, e.g. api.openai.com/v1/chat/completions"
        ));
    }
    let target = BlockTarget::Route { host: host.to_owned(), path_prefix: path.to_owned() };
    target.validated().map_err(|e| format!("invalid route {s:?}: {e}"))
}

/// Parse and normalise a cgroup: its cgroup v2 path as in `/proc/PID/cgroup`
/// (`/system.slice/app.service`), or its directory under this host's cgroup v2 mount
/// (`/sys/fs/cgroup/system.slice/app.service`), which is turned into the v2 path (see
/// [`crate::cgroup::Mounts::v2_path`]). The result is absolute, with no `.` or `..` or
/// empty components and no trailing `/` (except the root itself).
pub fn parse_cgroup(s: &str) -> Result<String, String> {
    parse_cgroup_in(s, &crate::cgroup::Mounts::of_this_host())
}

/// [`parse_cgroup`] with the cgroup mounts given.
pub fn parse_cgroup_in(s: &str, mounts: &crate::cgroup::Mounts) -> Result<String, String> {
    check_text("the cgroup path", s, MAX_NAME_BYTES)?;
    let s = &mounts.v2_path(s)?;
    if !s.starts_with('/') {
        return Err(format!(
            "cgroup path {s:?} must be absolute, as in /proc/PID/cgroup (e.g. /system.slice/app.service)"
        ));
    }
    let trimmed = s.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".to_owned());
    }
    if trimmed[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("cgroup path {s:?} has an empty, '.' or '..' component"));
    }
    Ok(trimmed.to_owned())
}

fn check_text(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.trim().is_empty() {
        return Err(format!("{what} is empty"));
    }
    if s.len() > max {
        return Err(format!("{what} is longer than {max} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{what} contains control characters (it must be one line of text)"));
    }
    Ok(())
}

fn check_name(what: &str, s: &str) -> Result<(), String> {
    check_text(what, s, MAX_NAME_BYTES)?;
    if s.chars().any(char::is_whitespace) {
        return Err(format!("{what} {s:?} contains white space"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Targets, scopes, specs

impl BlockTarget {
    /// Check and normalise (lower-case provider and host names, normalised cgroup paths).
    pub fn validated(self) -> Result<Self, String> {
        Ok(match self {
            Self::Provider(name) => {
                check_name("the provider name", &name)?;
                if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
                    return Err(format!(
                        "provider name {name:?} may only contain letters, digits, '.', '_' and '-' \
                         (e.g. openai, anthropic, azure_openai)"
                    ));
                }
                Self::Provider(name.to_ascii_lowercase())
            }
            Self::Dest(d) => Self::Dest(d.validated()?),
            Self::Model(name) => {
                check_name("the model name", &name)?;
                Self::Model(name)
            }
            Self::Route { host, path_prefix } => {
                check_name("the route host", &host)?;
                let host = host.trim_end_matches('.').to_ascii_lowercase();
                check_route_host(&host)?;
                check_name("the route path prefix", &path_prefix)?;
                if !path_prefix.starts_with('/') {
                    return Err(format!("route path prefix {path_prefix:?} must start with '/'"));
                }
                Self::Route { host, path_prefix }
            }
            Self::Tenant(cgroup) => Self::Tenant(parse_cgroup(&cgroup)?),
        })
    }

    /// Whether `s` is what this target stops (scope aside).
    pub fn matches(&self, s: &Subject<'_>) -> bool {
        match self {
            Self::Provider(name) => s.provider.is_some_and(|p| p.eq_ignore_ascii_case(name)),
            Self::Dest(d) => s.peer.is_some_and(|peer| d.matches(peer)),
            Self::Model(name) => s.model == Some(name.as_str()),
            Self::Route { host, path_prefix } => {
                s.host.is_some_and(|h| host_matches(host, h))
                    && s.path.is_some_and(|p| p.starts_with(path_prefix.as_str()))
            }
            Self::Tenant(cgroup) => s.cgroup.is_some_and(|c| crate::cgroup::covers(cgroup, c)),
        }
    }
}

/// A route host (lower case, trailing dots removed) in a form a request's `Host` can have,
/// so that the block can match: a name or an IPv4 address, a bare IPv6 address, or
/// `[IPv6]`; the first and the last with an optional `:port`. Anything else (`[::1]x`,
/// `host:port:x`) would be accepted and never stop a call.
fn check_route_host(host: &str) -> Result<(), String> {
    let invalid = || {
        format!(
            "route host {host:?} is not a host name or address (a name, an IPv4 address or [IPv6], each with an \
             optional :port, e.g. api.openai.com, localhost:11434, [::1]:8000)"
        )
    };
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => {
            let (address, after) = rest.split_once(']').ok_or_else(invalid)?;
            address.parse::<Ipv6Addr>().map_err(|_| invalid())?;
            match after {
                "" => return Ok(()),
                _ => ("", Some(after.strip_prefix(':').ok_or_else(invalid)?)),
            }
        }
        None if host.parse::<Ipv6Addr>().is_ok() => return Ok(()),
        None => match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        },
    };
    let name_ok = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0) && p.bytes().all(|b| b.is_ascii_digit()));
    if !name_ok || !port_ok || (name.is_empty() && !host.starts_with('[')) {
        return Err(invalid());
    }
    Ok(())
}

/// `pattern` (from a block, lower case) against a request's `Host`: the port is compared
/// only when the pattern has one.
fn host_matches(pattern: &str, host: &str) -> bool {
    let host = if has_port(pattern) { host } else { strip_port(host) };
    host.trim_end_matches('.').eq_ignore_ascii_case(pattern)
}

impl fmt::Display for BlockTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Provider(name) => write!(f, "provider {name}"),
            Self::Dest(d) => write!(f, "dest {d}"),
            Self::Model(name) => write!(f, "model {name}"),
            Self::Route { host, path_prefix } => write!(f, "route {host}{path_prefix}"),
            Self::Tenant(cgroup) => write!(f, "tenant {cgroup}"),
        }
    }
}

impl Dest {
    fn validated(self) -> Result<Self, String> {
        let max = max_prefix(self.net);
        if self.prefix > max {
            return Err(format!("prefix /{} is larger than {max}", self.prefix));
        }
        if self.port == Some(0) {
            return Err("port 0 is not a port".into());
        }
        let masked = mask(self.net, self.prefix);
        if masked != self.net {
            return Err(format!(
                "{}/{} has host bits set (did you mean {masked}/{}?)",
                self.net, self.prefix, self.prefix
            ));
        }
        Ok(self)
    }

    /// The network, as the crate's one CIDR type.
    pub fn ip_net(&self) -> IpNet {
        IpNet { addr: self.net, prefix: self.prefix }
    }

    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ip_net().contains(ip)
    }

    /// Whether a connection to `peer` is to this destination.
    pub fn matches(&self, peer: SocketAddr) -> bool {
        self.contains(peer.ip()) && self.port.is_none_or(|p| p == peer.port())
    }
}

impl fmt::Display for Dest {
    /// The form [`parse_dest`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let net = if self.prefix == max_prefix(self.net) {
            self.net.to_string()
        } else {
            format!("{}/{}", self.net, self.prefix)
        };
        match (self.net, self.port) {
            (IpAddr::V6(_), Some(port)) => write!(f, "[{net}]:{port}"),
            (_, Some(port)) => write!(f, "{net}:{port}"),
            (_, None) => f.write_str(&net),
        }
    }
}

impl Scope {
    /// Check and normalise.
    pub fn validated(self) -> Result<Self, String> {
        Ok(match self {
            Self::Host => Self::Host,
            Self::Cgroup(c) => Self::Cgroup(parse_cgroup(&c)?),
            Self::Exe(p) => {
                let text = p.to_str().ok_or_else(|| format!("executable path {} is not UTF-8", p.display()))?;
                check_text("the executable path", text, MAX_NAME_BYTES)?;
                if !p.is_absolute() {
                    return Err(format!("executable path {text:?} must be absolute"));
                }
                Self::Exe(p)
            }
        })
    }

    /// Whether a process in `s.cgroup` running `s.exe` is in this scope.
    pub fn matches(&self, s: &Subject<'_>) -> bool {
        match self {
            Self::Host => true,
            Self::Cgroup(scope) => s.cgroup.is_some_and(|c| crate::cgroup::covers(scope, c)),
            Self::Exe(exe) => s.exe == Some(exe.as_path()),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host => f.write_str("host"),
            Self::Cgroup(c) => write!(f, "cgroup {c}"),
            Self::Exe(p) => write!(f, "exe {}", p.display()),
        }
    }
}

impl Expiry {
    /// Expire `d` after the block is set (whole seconds).
    pub fn after(d: Duration) -> Self {
        Self::AfterSecs(d.as_secs())
    }

    /// The Unix time in ms when a block set at `now_ms` expires.
    pub fn deadline_ms(self, now_ms: u64) -> Result<u64, String> {
        let max_ms = MAX_EXPIRY_SECS * 1000;
        match self {
            Self::AfterSecs(0) => Err("the expiry must be more than zero seconds away".into()),
            Self::AfterSecs(secs) if secs > MAX_EXPIRY_SECS => {
                Err("the expiry is more than ten years away (leave the expiry out for a block that never expires)"
                    .into())
            }
            Self::AfterSecs(secs) => Ok(now_ms + secs * 1000),
            Self::AtUnix(secs) => {
                let at = secs.saturating_mul(1000);
                if at <= now_ms {
                    Err(format!("the expiry {} is in the past", rfc3339_ms(at)))
                } else if at - now_ms > max_ms {
                    Err("the expiry is more than ten years away (leave the expiry out for a block that never expires)"
                        .into())
                } else {
                    Ok(at)
                }
            }
        }
    }
}

impl BlockSpec {
    /// Check every field and normalise names; the error says which field and why.
    pub fn validated(self) -> Result<Self, String> {
        let Self { target, scope, expires, fallback, reason } = self;
        check_text("the reason", &reason, MAX_REASON_BYTES)
            .map_err(|e| format!("{e}: give one line saying why (it goes into the audit log)"))?;
        let target = target.validated()?;
        let scope = scope.validated()?;
        if matches!(target, BlockTarget::Tenant(_)) && scope != Scope::Host {
            return Err("a tenant block names its cgroup already: it takes no cgroup or exe scope".into());
        }
        let fallback = fallback.map(|f| check_fallback(&target, f)).transpose()?;
        Ok(Self { target, scope, expires, fallback, reason: reason.trim().to_owned() })
    }
}

/// A fallback endpoint for `target`, normalised (an IPv4-mapped address as IPv4).
fn check_fallback(target: &BlockTarget, fallback: SocketAddr) -> Result<SocketAddr, String> {
    let fallback = SocketAddr::new(fallback.ip().to_canonical(), fallback.port());
    if !matches!(target, BlockTarget::Provider(_) | BlockTarget::Dest(_)) {
        return Err(format!(
            "a fallback applies only to provider and dest blocks (the kernel redirects their connects); {target} is \
             blocked call by call: leave the fallback out"
        ));
    }
    if fallback.port() == 0 {
        return Err(format!("fallback {fallback}: port 0 is not a port"));
    }
    let ip = fallback.ip();
    if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(format!("fallback {fallback} is not an address a connection can be made to"));
    }
    if let BlockTarget::Dest(d) = target {
        if d.net.is_ipv4() != ip.is_ipv4() {
            let family = |v4: bool| if v4 { "IPv4" } else { "IPv6" };
            return Err(format!(
                "fallback {fallback} is {} but the destination {d} is {}: the kernel redirects a connect only \
                 within its address family",
                family(ip.is_ipv4()),
                family(d.net.is_ipv4())
            ));
        }
        if d.matches(fallback) {
            return Err(format!(
                "fallback {fallback} is inside the blocked destination {d}: connects to it would be blocked too"
            ));
        }
    }
    Ok(fallback)
}

// ---------------------------------------------------------------------------------------
// Actors

impl Actor {
    /// The process `pid` with credentials `uid`/`gid` (from `SO_PEERCRED`): its name from
    /// `/proc/PID/comm`, the user name from the user database.
    pub fn of_process(uid: u32, gid: u32, pid: u32) -> Self {
        let comm =
            std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim_end().to_owned()).unwrap_or_default();
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten().map(|u| u.name);
        Self { uid, gid, pid, comm, user }
    }

    /// This process: the actor of expiry and restore.
    pub fn agent() -> Self {
        Self::of_process(nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw(), std::process::id())
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let comm = self.comm.escape_debug();
        match &self.user {
            Some(user) => write!(f, "{user} (uid {}, pid {} {comm})", self.uid, self.pid),
            None => write!(f, "uid {} (pid {} {comm})", self.uid, self.pid),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Blocks and the table

impl Block {
    /// A block set now (`now_ms`) by `actor`; `spec` must be validated.
    pub fn new(id: String, spec: BlockSpec, actor: Actor, now_ms: u64) -> Result<Self, String> {
        let expires_unix_ms = spec.expires.map(|e| e.deadline_ms(now_ms)).transpose()?;
        Ok(Self {
            id,
            spec,
            created_by: actor,
            created_at: rfc3339_ms(now_ms),
            created_unix_ms: now_ms,
            expires_at: expires_unix_ms.map(rfc3339_ms),
            expires_unix_ms,
            fleet_version: None,
        })
    }

    /// Whether the block has ended at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_unix_ms.is_some_and(|at| at <= now_ms)
    }

    /// Whether the block stops `s`: its target matches and `s` is in its scope.
    pub fn matches(&self, s: &Subject<'_>) -> bool {
        self.spec.target.matches(s) && self.spec.scope.matches(s)
    }
}

static ID_COUNTER: AtomicU64 = AtomicU64::new(0);

fn candidate_id() -> String {
    let seed = (ID_COUNTER.fetch_add(1, Ordering::Relaxed), SystemTime::now(), std::process::id());
    format!("blk-{:08x}", RandomState::new().hash_one(seed) as u32)
}

impl BlockTable {
    /// A fresh id, unique in the table.
    pub fn new_id(&self) -> String {
        loop {
            let id = candidate_id();
            if self.get(&id).is_none() {
                return id;
            }
        }
    }

    /// Add `block`; refused when its id is taken or a block with the same target and scope
    /// is active.
    pub fn add(&mut self, block: Block) -> Result<(), String> {
        if self.get(&block.id).is_some() {
            return Err(format!("block id {} is taken", block.id));
        }
        if let Some(same) = self.same_as(&block.spec) {
            return Err(format!(
                "{} is already blocked ({}) by {}: unblock it first to change it",
                same.spec.target, same.spec.scope, same.id
            ));
        }
        self.blocks.push(block);
        Ok(())
    }

    /// The active block with the same target and scope as `spec`.
    pub fn same_as(&self, spec: &BlockSpec) -> Option<&Block> {
        self.blocks.iter().find(|b| b.spec.target == spec.target && b.spec.scope == spec.scope)
    }

    pub fn remove(&mut self, id: &str) -> Option<Block> {
        let i = self.blocks.iter().position(|b| b.id == id)?;
        Some(self.blocks.remove(i))
    }

    pub fn get(&self, id: &str) -> Option<&Block> {
        self.blocks.iter().find(|b| b.id == id)
    }

    /// The active blocks, oldest first.
    pub fn list(&self) -> &[Block] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Whether a block has ended at `now_ms`.
    pub fn has_expired(&self, now_ms: u64) -> bool {
        self.blocks.iter().any(|b| b.is_expired(now_ms))
    }

    /// Remove and return the blocks that have ended at `now_ms`.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Block> {
        let (expired, active) = std::mem::take(&mut self.blocks).into_iter().partition(|b| b.is_expired(now_ms));
        self.blocks = active;
        expired
    }

    /// When the next block ends.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.blocks.iter().filter_map(|b| b.expires_unix_ms).min()
    }

    /// The oldest block that stops `s`.
    pub fn matching(&self, s: &Subject<'_>) -> Option<&Block> {
        self.blocks.iter().find(|b| b.matches(s))
    }
}

// ---------------------------------------------------------------------------------------
// Emergency mode

impl Emergency {
    /// Whether emergency mode is on for a process in `cgroup`.
    pub fn applies_to(&self, cgroup: &str) -> bool {
        self.host || self.cgroups.iter().any(|scope| crate::cgroup::covers(scope, cgroup))
    }

    /// Turn host-wide mode (`cgroup` None) or a cgroup's mode on or off; `cgroup` must be
    /// normalised ([`parse_cgroup`]). Returns whether anything changed.
    pub fn set(&mut self, on: bool, cgroup: Option<&str>) -> bool {
        match (cgroup, on) {
            (None, on) => std::mem::replace(&mut self.host, on) != on,
            (Some(c), true) => self.cgroups.insert(c.to_owned()),
            (Some(c), false) => self.cgroups.remove(c),
        }
    }

    pub fn is_off(&self) -> bool {
        !self.host && self.cgroups.is_empty()
    }
}

impl fmt::Display for Emergency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cgroups = self.cgroups.iter().map(String::as_str).collect::<Vec<_>>().join(", ");
        match (self.host, self.cgroups.is_empty()) {
            (false, true) => f.write_str("off"),
            (true, true) => f.write_str("on host-wide"),
            (false, false) => write!(f, "on for cgroups {cgroups}"),
            (true, false) => write!(f, "on host-wide (and for cgroups {cgroups})"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Persistence

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    #[serde(default)]
    blocks: BlockTable,
    #[serde(default)]
    emergency: Emergency,
    /// The operator's `enforce on|off`, if any (absent in files of older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enforce_mode: Option<ModeChoice>,
}

impl ControlState {
    /// Read the state file; a missing file is an empty state. An unreadable or corrupt file
    /// is an error: starting without the blocks it holds would silently lift them. The
    /// mode holds the saved operator choice only: the caller resolves it against the
    /// config ([`ModeState::at_start`]).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let advice = "it was not written by this agent: move it away (its blocks are then lifted)";
        let bytes = match crate::files::read_capped(path, MAX_STATE_FILE_BYTES, advice) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(Self::default()),
            Err(e) => return Err(e).with_context(|| format!("cannot read the block state file {}", path.display())),
        };
        let file: StateFile = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the block state file {} is corrupt; repair it or move it away (its blocks are then lifted)",
                path.display()
            )
        })?;
        anyhow::ensure!(
            file.version <= STATE_VERSION,
            "the block state file {} has version {}, newer than this agent's {STATE_VERSION}: run the newer agent",
            path.display(),
            file.version
        );
        let mode = ModeState { operator: file.enforce_mode, ..ModeState::default() };
        Ok(Self { blocks: file.blocks, emergency: file.emergency, mode })
    }

    /// Write the state file atomically: a temporary file in the same directory (mode 0600),
    /// flushed, renamed over the old one, and the directory flushed. The directory is
    /// created (0750) when missing.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        create_private_dir(dir)?;
        let name = path.file_name().with_context(|| format!("state file path {} has no file name", path.display()))?;
        let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
        let file = StateFile {
            version: STATE_VERSION,
            blocks: self.blocks.clone(),
            emergency: self.emergency.clone(),
            enforce_mode: self.mode.operator.clone(),
        };
        let mut json = serde_json::to_vec_pretty(&file)?;
        json.push(b'\n');
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().with_context(|| format!("cannot write the block state file {}", path.display()))
    }
}

/// Create `dir` (and its missing parents) with mode 0750 when it does not exist.
pub(crate) fn create_private_dir(dir: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.exists() {
        return Ok(false);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)))
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{mode::EnforceMode, testutil::TempDir};

    fn spec(target: BlockTarget) -> BlockSpec {
        BlockSpec { target, scope: Scope::Host, expires: None, fallback: None, reason: "incident 42".into() }
    }

    fn actor() -> Actor {
        Actor { uid: 0, gid: 0, pid: 1, comm: "test".into(), user: Some("root".into()) }
    }

    fn block(table: &BlockTable, target: BlockTarget, expires: Option<Expiry>, now: u64) -> Block {
        let spec = BlockSpec { expires, ..spec(target) }.validated().unwrap();
        Block::new(table.new_id(), spec, actor(), now).unwrap()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration(" 1d "), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("3650d"), Ok(Duration::from_secs(MAX_EXPIRY_SECS)));
        let hint = "expected a whole number followed by s, m, h or d, e.g. 90s, 15m, 2h, 1d";
        for (input, message) in [
            ("", format!("invalid duration \"\": {hint}")),
            ("m", format!("invalid duration \"m\": {hint}")),
            ("-1s", format!("invalid duration \"-1s\": {hint}")),
            ("15", format!("invalid duration \"15\": missing unit; {hint}")),
            ("5x", format!("invalid duration \"5x\": unknown unit \"x\"; {hint}")),
            ("5 m", format!("invalid duration \"5 m\": unknown unit \" m\"; {hint}")),
            (
                "1.5h",
                "invalid duration \"1.5h\": fractions are not supported; use a smaller unit (90m, not 1.5h)".into(),
            ),
            ("0s", "invalid duration \"0s\": must be more than zero".into()),
            ("3651d", "invalid duration \"3651d\": more than ten years".into()),
            ("99999999999999999999999s", "invalid duration \"99999999999999999999999s\": more than ten years".into()),
        ] {
            assert_eq!(parse_duration(input), Err(message), "{input}");
        }
    }

    #[test]
    fn destinations() {
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(parse_dest("10.0.0.0/8:443"), Ok(Dest { net: v4("10.0.0.0"), prefix: 8, port: Some(443) }));
        assert_eq!(parse_dest("203.0.113.7"), Ok(Dest { net: v4("203.0.113.7"), prefix: 32, port: None }));
        assert_eq!(parse_dest("203.0.113.7:80"), Ok(Dest { net: v4("203.0.113.7"), prefix: 32, port: Some(80) }));
        assert_eq!(parse_dest("0.0.0.0/0"), Ok(Dest { net: v4("0.0.0.0"), prefix: 0, port: None }));
        assert_eq!(parse_dest("2001:db8::/32"), Ok(Dest { net: v4("2001:db8::"), prefix: 32, port: None }));
        assert_eq!(parse_dest("2001:db8::1"), Ok(Dest { net: v4("2001:db8::1"), prefix: 128, port: None }));
        assert_eq!(parse_dest("[2001:db8::1]:443"), Ok(Dest { net: v4("2001:db8::1"), prefix: 128, port: Some(443) }));
        assert_eq!(parse_dest("[2001:db8::/32]:443"), Ok(Dest { net: v4("2001:db8::"), prefix: 32, port: Some(443) }));
        assert_eq!(parse_dest("[2001:db8::]/32:443"), Ok(Dest { net: v4("2001:db8::"), prefix: 32, port: Some(443) }));
        assert_eq!(parse_dest("[2001:db8::]/32"), Ok(Dest { net: v4("2001:db8::"), prefix: 32, port: None }));
        // Display reads back.
        for s in [
            "10.0.0.0/8:443",
            "203.0.113.7",
            "203.0.113.7:80",
            "2001:db8::/32",
            "[2001:db8::1]:443",
            "[2001:db8::/32]:443",
        ] {
            let d = parse_dest(s).unwrap();
            assert_eq!(d.to_string(), s);
            assert_eq!(parse_dest(&d.to_string()), Ok(d));
        }

        let form = "expected ADDR[/PREFIX][:PORT], e.g. 10.0.0.0/8:443, 203.0.113.7, [2001:db8::/32]:443";
        for (input, why) in [
            ("10.0.0.1/8", "10.0.0.1/8 has host bits set (did you mean 10.0.0.0/8?)"),
            ("10.0.0.0/33", "prefix /33 is not a number from 0 to 32"),
            ("10.0.0.0/x", "prefix /x is not a number from 0 to 32"),
            ("2001:db8::/129", "prefix /129 is not a number from 0 to 128"),
            ("1.2.3.4:0", "port \"0\" is not a number from 1 to 65535"),
            ("1.2.3.4:65536", "port \"65536\" is not a number from 1 to 65535"),
            ("1.2.3.4:", "port \"\" is not a number from 1 to 65535"),
            ("api.openai.com:443", "\"api.openai.com\" is not an IP address (host names are not accepted)"),
            ("", "no address"),
            ("[2001:db8::1", "missing ']'"),
            ("[2001:db8::1]x", "unexpected \"x\" after ']'"),
            ("[2001:db8::/32]/32", "two prefixes"),
        ] {
            assert_eq!(parse_dest(input), Err(format!("invalid destination {input:?}: {why}; {form}")), "{input}");
        }
    }

    #[test]
    fn dest_matching() {
        let d = parse_dest("10.0.0.0/8:443").unwrap();
        assert!(d.matches("10.1.2.3:443".parse().unwrap()));
        assert!(!d.matches("10.1.2.3:80".parse().unwrap()));
        assert!(!d.matches("11.1.2.3:443".parse().unwrap()));
        assert!(d.matches("[::ffff:10.1.2.3]:443".parse().unwrap()), "IPv4-mapped");
        let any = parse_dest("2001:db8::/32").unwrap();
        assert!(any.matches("[2001:db8:1::5]:8443".parse().unwrap()));
        assert!(!any.matches("10.1.2.3:443".parse().unwrap()));
        assert!(parse_dest("0.0.0.0/0").unwrap().contains("192.0.2.1".parse().unwrap()));
    }

    /// Found by the `control` fuzz target: route host "[pi.001:db8:]om" was accepted, and
    /// the block could never match a request (a silent allow for its route).
    #[test]
    fn route_hosts_are_forms_a_request_can_carry() {
        let route = |host: &str| BlockTarget::Route { host: host.into(), path_prefix: "/v1".into() }.validated();
        for bad in
            ["[pi.001:db8:]om", "[::1]x", "[::1", "host:port", "host:0", "a:b]", "h:1:x", ".", "[zz::1]:80", ":443"]
        {
            let e = route(bad).unwrap_err();
            assert!(
                e.starts_with(&format!("route host {:?} is not a host name or address", bad.trim_end_matches('.'))),
                "{bad}: {e}"
            );
        }
        for good in [
            "api.openai.com",
            "API.OpenAI.com.",
            "localhost:11434",
            "10.0.0.1:443",
            "[::1]",
            "[2001:db8::1]:8443",
            "2001:db8::1",
            "my_host-1",
        ] {
            let target = route(good).unwrap_or_else(|e| panic!("{good}: {e}"));
            let BlockTarget::Route { host, .. } = &target else { unreachable!() };
            let subject = Subject { host: Some(host), path: Some("/v1/chat"), ..Subject::default() };
            assert!(target.matches(&subject), "{good}: a route block stops a request to its own host");
        }
    }

    #[test]
    fn routes_and_cgroups() {
        assert_eq!(
            parse_route("https://API.OpenAI.com/v1/chat"),
            Ok(BlockTarget::Route { host: "api.openai.com".into(), path_prefix: "/v1/chat".into() })
        );
        assert_eq!(
            parse_route("localhost:11434"),
            Ok(BlockTarget::Route { host: "localhost:11434".into(), path_prefix: "/".into() })
        );
        assert_eq!(
            parse_route("/v1/chat"),
            Err("invalid route \"/v1/chat\": no host; expected HOST/PATH-PREFIX, e.g. api.openai.com/v1/chat/completions"
                .into())
        );
        assert_eq!(
            parse_route("api.openai.com/v1 chat"),
            Err("invalid route \"api.openai.com/v1 chat\": the route path prefix \"/v1 chat\" contains white space"
                .into())
        );
        assert_eq!(parse_cgroup("/system.slice/app.service/"), Ok("/system.slice/app.service".into()));
        assert_eq!(parse_cgroup("/"), Ok("/".into()));
        assert_eq!(
            parse_cgroup("system.slice"),
            Err("cgroup path \"system.slice\" must be absolute, as in /proc/PID/cgroup (e.g. /system.slice/app.service)"
                .into())
        );
        assert_eq!(parse_cgroup("/a/../b"), Err("cgroup path \"/a/../b\" has an empty, '.' or '..' component".into()));
        assert_eq!(parse_cgroup("/a//b"), Err("cgroup path \"/a//b\" has an empty, '.' or '..' component".into()));
        assert_eq!(
            parse_cgroup("/a\u{1b}[2J"),
            Err("the cgroup path contains control characters (it must be one line of text)".into())
        );
        // The file system path of a cgroup, under the v2 mount wherever it is.
        let mounts = |v2: &str| crate::cgroup::Mounts { v2: Some(v2.into()), v1: vec!["/sys/fs/cgroup/memory".into()] };
        let hybrid = mounts("/sys/fs/cgroup/unified");
        assert_eq!(parse_cgroup_in("/sys/fs/cgroup/unified/team-a/", &hybrid), Ok("/team-a".into()));
        assert_eq!(parse_cgroup_in("/sys/fs/cgroup/unified", &hybrid), Ok("/".into()));
        assert_eq!(parse_cgroup_in("/srv/cg/team-a", &mounts("/srv/cg")), Ok("/team-a".into()));
        assert_eq!(parse_cgroup_in("/team-a", &hybrid), Ok("/team-a".into()));
        assert_eq!(
            parse_cgroup_in("/sys/fs/cgroup/unified/a//b", &hybrid),
            Err("cgroup path \"/a//b\" has an empty, '.' or '..' component".into())
        );
        assert!(
            parse_cgroup_in("/sys/fs/cgroup/memory/team-a", &hybrid)
                .is_err_and(|e| e.contains("cgroup v1 hierarchy mounted at /sys/fs/cgroup/memory")),
        );
        // This host's own mount.
        if let Some(root) = crate::cgroup::Mounts::of_this_host().v2 {
            assert_eq!(parse_cgroup(&format!("{root}/team-a/job-1")), Ok("/team-a/job-1".into()));
        }
    }

    #[test]
    fn spec_validation() {
        let ok = spec(BlockTarget::Provider("OpenAI".into())).validated().unwrap();
        assert_eq!(ok.target, BlockTarget::Provider("openai".into()));
        let err = |s: BlockSpec| s.validated().unwrap_err();
        assert_eq!(
            err(BlockSpec { reason: " ".into(), ..spec(BlockTarget::Model("m".into())) }),
            "the reason is empty: give one line saying why (it goes into the audit log)"
        );
        assert_eq!(
            err(BlockSpec { reason: "a\nforged line".into(), ..spec(BlockTarget::Model("m".into())) }),
            "the reason contains control characters (it must be one line of text): give one line saying why (it \
             goes into the audit log)"
        );
        assert_eq!(
            err(BlockSpec { reason: "x".repeat(1025), ..spec(BlockTarget::Model("m".into())) }),
            "the reason is longer than 1024 bytes: give one line saying why (it goes into the audit log)"
        );
        assert_eq!(
            err(spec(BlockTarget::Provider("open ai".into()))),
            "the provider name \"open ai\" contains white space"
        );
        assert_eq!(
            err(spec(BlockTarget::Provider("open/ai".into()))),
            "provider name \"open/ai\" may only contain letters, digits, '.', '_' and '-' (e.g. openai, anthropic, \
             azure_openai)"
        );
        assert_eq!(
            err(BlockSpec { scope: Scope::Cgroup("/x".into()), ..spec(BlockTarget::Tenant("/t".into())) }),
            "a tenant block names its cgroup already: it takes no cgroup or exe scope"
        );
        assert_eq!(
            err(BlockSpec { scope: Scope::Exe("python3".into()), ..spec(BlockTarget::Model("m".into())) }),
            "executable path \"python3\" must be absolute"
        );
        let d = Dest { net: "10.0.0.1".parse().unwrap(), prefix: 8, port: None };
        assert_eq!(err(spec(BlockTarget::Dest(d))), "10.0.0.1/8 has host bits set (did you mean 10.0.0.0/8?)");
        assert_eq!(
            Expiry::AfterSecs(0).deadline_ms(5000),
            Err("the expiry must be more than zero seconds away".into())
        );
        assert_eq!(
            Expiry::AtUnix(4).deadline_ms(5000),
            Err("the expiry 1970-01-01T00:00:04.000000Z is in the past".into())
        );
        assert_eq!(Expiry::AtUnix(6).deadline_ms(5000), Ok(6000));

        // Fallbacks: provider and dest blocks only, an address a connect can go to, in the
        // destination's family and outside it.
        let fb = |target: BlockTarget, addr: &str| BlockSpec { fallback: Some(addr.parse().unwrap()), ..spec(target) };
        let openai = || BlockTarget::Provider("openai".into());
        let dest = |s: &str| BlockTarget::Dest(parse_dest(s).unwrap());
        assert_eq!(
            fb(openai(), "127.0.0.1:8443").validated().unwrap().fallback,
            Some("127.0.0.1:8443".parse().unwrap())
        );
        assert_eq!(
            fb(openai(), "[::ffff:10.0.0.5]:443").validated().unwrap().fallback,
            Some("10.0.0.5:443".parse().unwrap()),
            "IPv4-mapped: as IPv4"
        );
        assert!(fb(dest("10.0.0.0/8:443"), "10.0.0.5:8443").validated().is_ok(), "same network, another port");
        assert_eq!(
            err(fb(BlockTarget::Model("gpt-4o".into()), "127.0.0.1:8443")),
            "a fallback applies only to provider and dest blocks (the kernel redirects their connects); model gpt-4o \
             is blocked call by call: leave the fallback out"
        );
        assert!(err(fb(BlockTarget::Tenant("/t".into()), "127.0.0.1:8443")).starts_with("a fallback applies only"));
        assert_eq!(err(fb(openai(), "127.0.0.1:0")), "fallback 127.0.0.1:0: port 0 is not a port");
        assert_eq!(
            err(fb(openai(), "0.0.0.0:443")),
            "fallback 0.0.0.0:443 is not an address a connection can be made to"
        );
        assert_eq!(
            err(fb(dest("10.0.0.0/8:443"), "[::1]:443")),
            "fallback [::1]:443 is IPv6 but the destination 10.0.0.0/8:443 is IPv4: the kernel redirects a connect \
             only within its address family"
        );
        assert_eq!(
            err(fb(dest("10.0.0.0/8"), "10.1.2.3:8443")),
            "fallback 10.1.2.3:8443 is inside the blocked destination 10.0.0.0/8: connects to it would be blocked too"
        );
        assert_eq!(Expiry::after(Duration::from_secs(90)).deadline_ms(5000), Ok(95_000));
    }

    #[test]
    fn table_add_remove_expire() {
        let mut t = BlockTable::default();
        let now = 1_700_000_000_000;
        let a = block(&t, BlockTarget::Provider("openai".into()), None, now);
        t.add(a.clone()).unwrap();
        let b = block(&t, BlockTarget::Model("gpt-4o".into()), Some(Expiry::AfterSecs(60)), now);
        t.add(b.clone()).unwrap();
        let c = block(&t, BlockTarget::Tenant("/t".into()), Some(Expiry::AfterSecs(120)), now);
        t.add(c.clone()).unwrap();
        assert_eq!(t.len(), 3);
        assert!(a.id.starts_with("blk-") && a.id.len() == 12 && a.id[4..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(b.expires_unix_ms, Some(now + 60_000));
        assert_eq!(b.expires_at.as_deref(), Some("2023-11-14T22:14:20.000000Z"));
        assert_eq!(b.created_at, "2023-11-14T22:13:20.000000Z");

        // Same target and scope: refused, naming the active block.
        let dup = block(&t, BlockTarget::Provider("OPENAI".into()), None, now);
        assert_eq!(
            t.add(dup),
            Err(format!("provider openai is already blocked (host) by {}: unblock it first to change it", a.id))
        );
        // Same target, another scope: fine.
        let mut scoped = block(&t, BlockTarget::Provider("openai".into()), None, now);
        scoped.spec.scope = Scope::Cgroup("/x".into());
        t.add(scoped.clone()).unwrap();

        assert_eq!(t.next_expiry_ms(), Some(now + 60_000));
        assert!(t.expire(now + 59_999).is_empty());
        assert!(!t.has_expired(now + 59_999));
        assert_eq!(t.expire(now + 60_000), vec![b.clone()]);
        assert_eq!(t.list().iter().map(|b| &b.id).collect::<Vec<_>>(), [&a.id, &c.id, &scoped.id]);
        assert_eq!(t.remove(&a.id), Some(a.clone()));
        assert_eq!(t.remove(&a.id), None);
        assert_eq!(t.expire(u64::MAX), vec![c]);
        assert_eq!(t.list(), [scoped]);
    }

    #[test]
    fn matching_calls() {
        let mut t = BlockTable::default();
        let now = 1;
        let mut m = block(&t, BlockTarget::Model("gpt-4o".into()), None, now);
        m.spec.scope = Scope::Cgroup("/team-a".into());
        t.add(m.clone()).unwrap();
        let r = block(&t, parse_route("api.openai.com/v1/chat").unwrap(), None, now);
        t.add(r.clone()).unwrap();
        let mut e = block(&t, BlockTarget::Provider("anthropic".into()), None, now);
        e.spec.scope = Scope::Exe("/usr/bin/python3".into());
        t.add(e.clone()).unwrap();

        let call = Subject { model: Some("gpt-4o"), cgroup: Some("/team-a/job-1"), ..Subject::default() };
        assert_eq!(t.matching(&call), Some(&m));
        assert_eq!(t.matching(&Subject { cgroup: Some("/team-b"), ..call }), None);
        assert_eq!(t.matching(&Subject { model: Some("gpt-4o-mini"), ..call }), None);

        let route =
            Subject { host: Some("API.openai.com:443"), path: Some("/v1/chat/completions"), ..Subject::default() };
        assert_eq!(t.matching(&route), Some(&r));
        assert_eq!(t.matching(&Subject { path: Some("/v1/embeddings"), ..route }), None);
        assert_eq!(t.matching(&Subject { host: Some("api.openai.com.evil"), ..route }), None);

        let exe =
            Subject { provider: Some("anthropic"), exe: Some(Path::new("/usr/bin/python3")), ..Subject::default() };
        assert_eq!(t.matching(&exe), Some(&e));
        assert_eq!(t.matching(&Subject { exe: Some(Path::new("/usr/bin/node")), ..exe }), None);
        assert!(host_matches("localhost:11434", "localhost:11434"));
        assert!(!host_matches("localhost:11434", "localhost:8080"));
    }

    #[test]
    fn emergency() {
        let mut em = Emergency::default();
        assert!(em.is_off() && !em.applies_to("/a"));
        assert_eq!(em.to_string(), "off");
        assert!(em.set(true, Some("/team-a")));
        assert!(!em.set(true, Some("/team-a")));
        assert!(em.applies_to("/team-a/job") && em.applies_to("/team-a") && !em.applies_to("/team-b"));
        assert_eq!(em.to_string(), "on for cgroups /team-a");
        assert!(em.set(true, None));
        assert!(em.applies_to("/team-b"));
        assert_eq!(em.to_string(), "on host-wide (and for cgroups /team-a)");
        assert!(em.set(false, None));
        assert!(!em.set(false, None));
        assert!(!em.applies_to("/team-b") && em.applies_to("/team-a/x"));
        assert!(em.set(false, Some("/team-a")));
        assert!(em.is_off());
    }

    #[test]
    fn persistence_round_trip() {
        let dir = TempDir::new("state");
        let path = dir.path().join("lib/aegis/blocks.json");
        assert_eq!(ControlState::load(&path).unwrap(), ControlState::default());

        let mut state = ControlState::default();
        let b = block(
            &state.blocks,
            BlockTarget::Dest(parse_dest("[2001:db8::/32]:443").unwrap()),
            Some(Expiry::AfterSecs(90)),
            42,
        );
        state.blocks.add(b).unwrap();
        let mut r = block(&state.blocks, parse_route("api.openai.com/v1").unwrap(), None, 43);
        r.spec.scope = Scope::Exe("/usr/bin/python3".into());
        state.blocks.add(r).unwrap();
        state.emergency.set(true, Some("/team-a"));
        state.save(&path).unwrap();
        assert_eq!(ControlState::load(&path).unwrap(), state);
        assert!(!std::fs::read_to_string(&path).unwrap().contains("enforce_mode"), "no choice, no key");

        // An operator's mode choice is saved; what the config says is not (it is read at start).
        let actor = Actor { uid: 0, gid: 0, pid: 7, comm: "bash".into(), user: None };
        state.mode = ModeState::at_start(EnforceMode::Enforce, None).0;
        assert!(state.mode.choose(EnforceMode::Observe, &actor, 42));
        state.save(&path).unwrap();
        let loaded = ControlState::load(&path).unwrap();
        assert_eq!(loaded.mode.operator, state.mode.operator);
        assert_eq!(
            loaded.mode.operator.as_ref().map(|c| (c.mode, c.config_mode)),
            Some((EnforceMode::Observe, EnforceMode::Enforce))
        );
        assert_eq!((loaded.blocks, loaded.emergency), (state.blocks.clone(), state.emergency.clone()));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o750);
        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["blocks.json"], "no temporary file left");

        // Overwrite, then a corrupt file is an error, not an empty table.
        ControlState::default().save(&path).unwrap();
        assert_eq!(ControlState::load(&path).unwrap(), ControlState::default());
        std::fs::write(&path, "{\"version\":1,\"blocks\":[{").unwrap();
        let err = format!("{:#}", ControlState::load(&path).unwrap_err());
        assert!(err.contains("is corrupt; repair it or move it away"), "{err}");
        std::fs::write(&path, "{\"version\":9}").unwrap();
        let err = format!("{:#}", ControlState::load(&path).unwrap_err());
        assert!(err.contains("has version 9, newer than this agent's 1"), "{err}");
        // Not a regular file: refused at once, never read without end.
        let err = format!("{:#}", ControlState::load(Path::new("/dev/zero")).unwrap_err());
        assert!(err.contains("/dev/zero: it is a character device, not a regular file"), "{err}");
    }
}
