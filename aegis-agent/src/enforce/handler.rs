//! The daemon's side of the control plane: turns the operator's blocks into kernel rules,
//! destroys the connections a new block covers, and ends the connection of a call that
//! the data path stops.
//!
//! - Provider and destination blocks become connect/sendmsg rules ([`super::connect`]):
//!   a provider is every address its host names resolve to (refreshed, and learned from
//!   the hosts captured calls go to), on its ports. A block with a fallback redirects
//!   connects instead of refusing them.
//! - Model, route and tenant blocks share connections with allowed calls: they act on
//!   the parsed call ([`super::verdict`]), not in the connect programs.
//! - Emergency mode and the enforcement mode are read by the data path from the control
//!   view; a mode switch reaches [`Enforcer::apply`] as [`Change::Mode`] (and the mode at
//!   start in [`Change::Restored`]), the place for kernel-side enforcement that must follow
//!   the mode.

use std::{
    collections::HashSet,
    net::{SocketAddr, ToSocketAddrs as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime},
};

use super::{
    connect::{ConnectGuard, DestRule, RuleAction, RuleScope},
    providers::ProviderBook,
    sockdiag::{self, Destination, IpNet, OwnerScope},
    verdict::{ConnectionKiller, HostBook},
};
use crate::control::{ApplyReport, Block, BlockTarget, Change, ControlHandler, EnforceMode, Scope};

/// The kernel block number of a block id (`blk-` and 8 hex digits).
pub fn kernel_id(id: &str) -> u32 {
    id.strip_prefix("blk-").and_then(|h| u32::from_str_radix(h, 16).ok()).unwrap_or(0)
}

/// The block id of a kernel block number.
pub fn block_id(kernel: u32) -> String {
    format!("blk-{kernel:08x}")
}

/// Kernel-side enforcement that acts only while the agent enforces (the content gate): told
/// of every switch of the enforcement mode.
pub trait ModeFollower: Send + Sync {
    /// Follow `mode`: a note for the operator, or why it could not (the switch is undone).
    fn follow(&self, mode: EnforceMode) -> Result<String, String>;
}

/// Something that finds the socket of a TLS connection (the content gate's index).
pub trait SocketIndex: Send + Sync {
    /// Local and remote address of the TCP socket under `conn` of process `tgid`.
    fn socket_of(&self, tgid: u32, conn: u64) -> Option<(SocketAddr, SocketAddr)>;
}

pub struct Enforcer {
    guard: Mutex<Option<ConnectGuard>>,
    providers: Arc<ProviderBook>,
    /// The cgroup v2 mount: block scopes name cgroups as /proc/PID/cgroup does.
    cgroup_root: PathBuf,
    /// The active blocks as last applied.
    blocks: Mutex<Vec<Block>>,
    sockets: OnceLock<Arc<dyn SocketIndex>>,
    follower: OnceLock<Arc<dyn ModeFollower>>,
}

impl Enforcer {
    /// `guard`: None when enforcement in the kernel is off (blocks then act on parsed
    /// calls only).
    pub fn new(guard: Option<ConnectGuard>, providers: Arc<ProviderBook>, cgroup_root: PathBuf) -> Self {
        Self {
            guard: Mutex::new(guard),
            providers,
            cgroup_root,
            blocks: Mutex::new(Vec::new()),
            sockets: OnceLock::new(),
            follower: OnceLock::new(),
        }
    }

    /// Tell `follower` of every switch of the enforcement mode (it is told the mode in force
    /// when it starts by whoever starts it).
    pub fn set_mode_follower(&self, follower: Arc<dyn ModeFollower>) {
        let _ = self.follower.set(follower);
    }

    /// Use `index` to find the socket of a connection to destroy.
    pub fn set_socket_index(&self, index: Arc<dyn SocketIndex>) {
        let _ = self.sockets.set(index);
    }

    /// Run `f` on the connect guard, if enforcement in the kernel is on.
    pub fn with_guard<T>(&self, f: impl FnOnce(&mut ConnectGuard) -> T) -> Option<T> {
        self.guard.lock().unwrap_or_else(|e| e.into_inner()).as_mut().map(f)
    }

    /// Take the guard out (at shutdown).
    pub fn take_guard(&self) -> Option<ConnectGuard> {
        self.guard.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// A provider's addresses changed (refresh or learning): put the rules in step and cut
    /// connections to the new addresses that a block covers.
    pub fn provider_changed(&self, provider: &str) {
        let blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let affected: Vec<&Block> = blocks
            .iter()
            .filter(|b| matches!(&b.spec.target, BlockTarget::Provider(p) if p.eq_ignore_ascii_case(provider)))
            .collect();
        if affected.is_empty() {
            return;
        }
        match self.sync(&blocks) {
            Ok(notes) => {
                let killed: u64 = affected.iter().map(|b| self.kill_covered(b)).sum();
                tracing::info!(provider, killed, notes = ?notes, "provider addresses changed; blocks updated");
            }
            Err(e) => {
                tracing::error!(provider, error = %e, "provider addresses changed but the blocks could not be updated")
            }
        }
    }

    /// Stop refreshing the providers of `gone` that no remaining block names.
    fn release_unused(&self, remaining: &[Block], gone: &[Block]) {
        for b in gone {
            if let BlockTarget::Provider(p) = &b.spec.target
                && !remaining.iter().any(|x| matches!(&x.spec.target, BlockTarget::Provider(q) if q == p))
            {
                let _ = self.providers.release(p);
            }
        }
    }

    /// Make the kernel rules those of `blocks`. Returns notes for the operator.
    fn sync(&self, blocks: &[Block]) -> Result<Vec<String>, String> {
        let (rules, mut notes) = self.compile(blocks)?;
        match self.with_guard(|g| g.set_rules(&rules)) {
            Some(report) => {
                let r = report.map_err(|e| format!("{e:#}"))?;
                notes.push(format!(
                    "{} kernel rules in force (added {}, updated {}, removed {})",
                    r.rules, r.added, r.updated, r.removed
                ));
            }
            None if !rules.is_empty() => notes.push(
                "destination blocks are unavailable on this host (see aegis-agent status): new connects are not \
                 refused; open connections are destroyed and parsed calls stopped"
                    .into(),
            ),
            None => {}
        }
        Ok(notes)
    }

    /// Kernel rules for the provider and destination blocks.
    fn compile(&self, blocks: &[Block]) -> Result<(Vec<DestRule>, Vec<String>), String> {
        let mut rules = Vec::new();
        let mut notes = Vec::new();
        for b in blocks {
            let dests = self.destinations(b)?;
            if dests.is_empty() {
                continue;
            }
            let scope = match &b.spec.scope {
                Scope::Host => RuleScope::Any,
                Scope::Cgroup(c) => RuleScope::Cgroup(self.cgroup_root.join(c.trim_start_matches('/'))),
                Scope::Exe(p) => RuleScope::Exe(p.clone()),
            };
            let action = match b.spec.fallback {
                Some(to) => RuleAction::Redirect(to),
                None => RuleAction::Deny,
            };
            let expires = b.expires_unix_ms.map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
            for d in dests {
                rules.push(DestRule {
                    id: kernel_id(&b.id),
                    net: d.net,
                    port: d.port,
                    scope: scope.clone(),
                    action,
                    expires,
                });
            }
            if let BlockTarget::Provider(p) = &b.spec.target {
                let n = self.providers.addresses(p).map(|a| a.nets.len()).unwrap_or(0);
                notes.push(format!("provider {p}: {n} address(es)"));
            }
        }
        Ok((rules, notes))
    }

    /// The destinations a block covers in the kernel (none for model, route, tenant).
    fn destinations(&self, b: &Block) -> Result<Vec<Destination>, String> {
        Ok(match &b.spec.target {
            BlockTarget::Dest(d) => {
                let net = IpNet::new(d.net, d.prefix).ok_or_else(|| format!("invalid prefix in {d}"))?;
                vec![Destination { net, port: d.port }]
            }
            BlockTarget::Provider(p) => {
                let a = self.providers.addresses(p).map_err(|e| e.to_string())?;
                // `nets` and `ports` are each without duplicates.
                let mut out = Vec::new();
                for &net in &a.nets {
                    if a.ports.is_empty() {
                        out.push(Destination { net, port: None });
                    }
                    out.extend(a.ports.iter().map(|&port| Destination { net, port: Some(port) }));
                }
                out
            }
            BlockTarget::Model(_) | BlockTarget::Route { .. } | BlockTarget::Tenant(_) => Vec::new(),
        })
    }

    /// Destroy the open connections `b` covers; how many died.
    fn kill_covered(&self, b: &Block) -> u64 {
        let Ok(dests) = self.destinations(b) else { return 0 };
        if dests.is_empty() {
            return 0;
        }
        let owners = match &b.spec.scope {
            Scope::Host => OwnerScope::Any,
            Scope::Cgroup(c) => OwnerScope::Cgroup(c.clone()),
            Scope::Exe(p) => OwnerScope::Exe(p.clone()),
        };
        match sockdiag::kill_connections(&dests, &owners) {
            Ok(r) => {
                if r.failed > 0 {
                    tracing::warn!(block = %b.id, failed = r.failed, "some connections could not be destroyed");
                }
                r.destroyed as u64
            }
            Err(e) => {
                tracing::error!(block = %b.id, error = %e, "cannot destroy the connections this block covers");
                0
            }
        }
    }
}

impl ControlHandler for Enforcer {
    fn apply(&self, change: &Change) -> Result<ApplyReport, String> {
        let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        let before = blocks.clone();
        let mut fresh: Vec<Block> = Vec::new();
        match change {
            Change::Restored { blocks: b, .. } => {
                for p in b.iter().filter_map(|x| match &x.spec.target {
                    BlockTarget::Provider(p) => Some(p),
                    _ => None,
                }) {
                    if let Err(e) = self.providers.resolve_now(p) {
                        tracing::error!(provider = %p, error = %e, "a restored provider block names an unknown provider");
                    }
                }
                *blocks = b.clone();
                fresh = b.clone();
            }
            Change::Blocked(b) => {
                if let BlockTarget::Provider(p) = &b.spec.target {
                    // Fresh addresses before the rules are written.
                    let r = self.providers.resolve_now(p).map_err(|e| e.to_string())?;
                    if r.addresses.nets.is_empty() {
                        return Err(format!(
                            "provider {p} has no address yet (its host names did not resolve: {:?}); block it \
                             by --dest, or fix name resolution",
                            r.failed
                        ));
                    }
                }
                blocks.push(b.clone());
                fresh.push(b.clone());
            }
            Change::Unblocked(b) => {
                blocks.retain(|x| x.id != b.id);
                self.release_unused(&blocks, std::slice::from_ref(b));
            }
            Change::Expired(gone) => {
                let ids: HashSet<&str> = gone.iter().map(|b| b.id.as_str()).collect();
                blocks.retain(|x| !ids.contains(x.id.as_str()));
                self.release_unused(&blocks, gone);
            }
            Change::Fleet { added, removed, mode, .. } => {
                // A mode the policy switched to: the kernel side follows first (an error
                // undoes the whole policy).
                if let (Some(mode), Some(f)) = (mode, self.follower.get()) {
                    f.follow(*mode)?;
                }
                for p in added.iter().filter_map(|x| match &x.spec.target {
                    BlockTarget::Provider(p) => Some(p),
                    _ => None,
                }) {
                    // As for an operator's block: fresh addresses before the rules are written.
                    let r = self.providers.resolve_now(p).map_err(|e| e.to_string())?;
                    if r.addresses.nets.is_empty() {
                        return Err(format!(
                            "provider {p} has no address yet (its host names did not resolve: {:?})",
                            r.failed
                        ));
                    }
                }
                // One rule set for the kernel: the new rules and the old ones' removal are
                // one update, so nothing the policy keeps is ever let through in between.
                let gone: HashSet<&str> = removed.iter().map(|b| b.id.as_str()).collect();
                blocks.retain(|x| !gone.contains(x.id.as_str()));
                blocks.extend(added.iter().cloned());
                let new_ids: HashSet<&str> =
                    removed.iter().filter(|b| added.iter().any(|a| a.id == b.id)).map(|b| b.id.as_str()).collect();
                fresh = added.iter().filter(|b| !new_ids.contains(b.id.as_str())).cloned().collect();
                let lifted: Vec<Block> =
                    removed.iter().filter(|b| !added.iter().any(|a| a.id == b.id)).cloned().collect();
                self.release_unused(&blocks, &lifted);
            }
            Change::Emergency { on, cgroup, .. } => {
                let scope = cgroup.as_deref().unwrap_or("the whole host");
                let note = if *on {
                    format!(
                        "emergency mode on for {scope}: warn verdicts become block, and the rules' block verdicts \
                         stop calls there in observe mode too"
                    )
                } else {
                    format!("emergency mode off for {scope}")
                };
                return Ok(ApplyReport { killed_connections: 0, notes: vec![note] });
            }
            // The data path reads the mode from the control view; the kernel side follows.
            Change::Mode { mode } => {
                let notes = match self.follower.get() {
                    Some(f) => vec![f.follow(*mode)?],
                    None => Vec::new(),
                };
                return Ok(ApplyReport { killed_connections: 0, notes });
            }
        }
        let notes = match self.sync(&blocks) {
            Ok(n) => n,
            Err(e) => {
                *blocks = before;
                return Err(format!("the kernel rules could not be updated: {e}"));
            }
        };
        drop(blocks);
        let killed = fresh.iter().map(|b| self.kill_covered(b)).sum();
        Ok(ApplyReport { killed_connections: killed, notes })
    }
}

impl ConnectionKiller for Enforcer {
    fn kill(&self, tgid: u32, conn: u64, host: Option<&str>) -> Result<u32, String> {
        if let Some((local, peer)) = self.sockets.get().and_then(|s| s.socket_of(tgid, conn)) {
            return match sockdiag::kill_socket(local, peer) {
                Ok(true) => Ok(1),
                Ok(false) => Err(format!("socket {local} -> {peer} was already gone")),
                Err(e) => Err(format!("destroying {local} -> {peer}: {e}")),
            };
        }
        // Not in the gate's index: every connection of the process to the request's host.
        let host = host.ok_or("the connection's socket is unknown and the request named no host")?;
        let dests = host_destinations(host)?;
        let report = sockdiag::kill_connections(&dests, &OwnerScope::Pids(HashSet::from([tgid])))
            .map_err(|e| format!("destroying pid {tgid}'s connections to {host}: {e}"))?;
        Ok(report.destroyed as u32)
    }
}

impl HostBook for Enforcer {
    fn seen(&self, host: &str) -> Option<String> {
        self.providers.learn(host);
        self.providers.provider_for_host(host)
    }

    fn provider(&self, host: &str) -> Option<String> {
        self.providers.provider_for_host(host)
    }
}

/// The addresses and port a Host header names (port 443 when absent).
fn host_destinations(host: &str) -> Result<Vec<Destination>, String> {
    let with_port = if crate::net::has_port(host) {
        host.to_owned()
    } else if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:443") // a bare IPv6 address
    } else {
        format!("{host}:443")
    };
    let addrs: Vec<SocketAddr> =
        with_port.to_socket_addrs().map_err(|e| format!("cannot resolve {host}: {e}"))?.collect();
    Ok(addrs
        .into_iter()
        .map(|a| Destination { net: IpNet::host(a.ip().to_canonical()), port: Some(a.port()) })
        .collect())
}

/// A cgroup v2 path as /proc/PID/cgroup names it, from its directory.
pub fn cgroup_name(root: &Path, dir: &Path) -> Option<String> {
    let rel = dir.strip_prefix(root).ok()?;
    Some(format!("/{}", rel.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_ids_round_trip() {
        assert_eq!(kernel_id("blk-00c0ffee"), 0xc0ffee);
        assert_eq!(block_id(0xc0ffee), "blk-00c0ffee");
        assert_eq!(kernel_id("nonsense"), 0);
    }

    #[test]
    fn host_headers_become_destinations() {
        let d = host_destinations("127.0.0.1:8443").unwrap();
        assert_eq!(d, [Destination { net: IpNet::host("127.0.0.1".parse().unwrap()), port: Some(8443) }]);
        let d = host_destinations("127.0.0.1").unwrap();
        assert_eq!(d[0].port, Some(443));
        let d = host_destinations("[::1]:9000").unwrap();
        assert_eq!(d, [Destination { net: IpNet::host("::1".parse().unwrap()), port: Some(9000) }]);
    }
}
