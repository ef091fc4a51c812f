//! Operator control plane: a local unix-socket API between the running daemon and its
//! CLI subcommands (`block`, `unblock`, `blocks`, `emergency`, `disable`, `enforce`), the
//! table of blocks with expiry, the enforcement mode, and the append-only audit log.
//!
//! # Design
//!
//! - [`protocol`]: newline-delimited JSON, one request and one response per connection,
//!   each carrying the protocol version `v`.
//! - [`server`]: [`ControlServer::start`] binds the socket, loads the saved state, has the
//!   daemon's [`ControlHandler`] enforce it, and serves on a thread of its own. It is the
//!   only writer of the state: changes are serialised, saved atomically to the state file,
//!   published to the [`ControlView`] the data path reads, enforced by the handler (undone
//!   if that fails), and audited, in that order. Expiry runs on a timer in the same place.
//! - [`client`]: a synchronous client for the CLI, with errors that say what to do.
//! - [`blocks`]: the block model, the table, the emergency state, their persistence, and
//!   the parsers for the command-line forms.
//! - [`mode`]: observe or enforce (whether rule verdicts act), and which of the config
//!   and the operator's saved choice decides after a restart.
//! - [`audit`]: one fsync'd JSON line per change and per refused request.
//! - [`render`]: the `blocks` table and JSON, and one-line summaries.
//!
//! Bounds: at most `max_clients` connections at once (more get an error and are closed),
//! requests of at most `max_request_bytes` (64 KiB), `read_timeout_ms` (5 s) for a client
//! to send its request and take its response, `max_blocks` active blocks.
//!
//! # Threat model of the socket
//!
//! Whoever can use the socket can stop this host's LLM traffic (block, enforce on), let it
//! through again (unblock the operator's blocks, turn emergency mode or enforcement off),
//! and read every block's reason: it is as sensitive as root. Therefore:
//!
//! - **Who**: root, the agent's own user, and members of one configured group. The
//!   kernel enforces it first: the socket is mode 0660 owned by root and that group (0600
//!   with no group), created under its final mode (bound under a temporary name, then
//!   renamed) in a directory created 0750. The group is given without CAP_CHOWN (which
//!   the systemd unit does not grant): the agent runs with it (`Group=aegis`), so what it
//!   creates is in it already. The server checks again per connection with
//!   `SO_PEERCRED` (uid, gid, pid as of `connect`) and `SO_PEERGROUPS` (supplementary
//!   groups as of `connect`; `/proc/PID/status` only on kernels without it, checking the
//!   process there still has the peer's uid), so a socket made world-writable by mistake,
//!   or passed to another process, still admits no one else. Refusals are audited.
//! - **Not a remote interface**: a unix socket only; no TCP, no authentication tokens.
//! - **Denial of service by allowed users** is bounded, not prevented: a slow client holds
//!   one of `max_clients` slots for at most the read timeout; oversized or malformed
//!   requests are answered with an error and the connection closed; the table is capped.
//! - **Forged evidence**: texts from clients (reasons, names, paths) must be one line
//!   without control characters, are JSON-escaped in the audit log and escaped again when
//!   printed, so they can neither forge audit lines nor rewrite a terminal.
//! - **Stale state**: a stale socket file is removed only if it is a socket nobody
//!   listens on; anything else at that path is left alone and the start fails. A corrupt
//!   state file stops the start (rather than silently lifting its blocks).
//! - **Out of scope**: root itself (it can do anything to the agent), and the integrity
//!   of the audit log against root (it is append-only by convention, fsync'd for
//!   durability, not tamper-evident).

pub mod audit;
pub mod blocks;
pub mod client;
pub mod drills;
pub mod mode;
pub mod protocol;
pub mod render;
pub mod server;

pub use audit::{AuditAction, AuditEntry, AuditLog, Outcome};
pub use blocks::{
    Actor, Block, BlockSpec, BlockTable, BlockTarget, ControlState, Dest, Emergency, Expiry, Scope, Subject,
    parse_cgroup, parse_cgroup_in, parse_dest, parse_duration, parse_route,
};
pub use client::{ClientError, call, request};
pub use mode::{EnforceMode, ModeChoice, ModeState};
pub use protocol::{AgentStatus, ApplyReport, CaptureHealth, FleetStatus, PROTOCOL_VERSION, Reply, Request, Response};
pub use server::{
    CaptureHealthSlot, Change, ContainmentOff, ControlConfig, ControlHandler, ControlServer, ControlView,
    DEFAULT_AUDIT_LOG, DEFAULT_SOCKET, DEFAULT_STATE_FILE, FleetApplier, NoopHandler, ServerHandle, resolve_group,
};

/// `group aegis (gid 997)`, or `gid 4242` for a gid without a name.
pub(crate) fn group_label(gid: u32) -> String {
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(g)) => format!("group {} (gid {gid})", g.name),
        _ => format!("gid {gid}"),
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::{
        os::unix::fs::PermissionsExt as _,
        path::{Path, PathBuf},
        sync::atomic::{AtomicU32, Ordering},
    };

    /// A fresh directory under the system temporary directory (mode 0755), removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
            let path = std::env::temp_dir().join(format!(
                "aegis-ctl-{tag}-{}-{}-{nanos:x}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            Self(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A tmpfs of `size` (as `mount -o size=`) on a fresh directory, for full-disk tests:
    /// unmounted on drop. Needs root (CI is root).
    pub struct SmallDisk {
        dir: TempDir,
        mnt: PathBuf,
    }

    impl SmallDisk {
        pub fn new(tag: &str, size: &str) -> Self {
            assert!(nix::unistd::geteuid().is_root(), "{tag}: this test mounts a tmpfs: run it as root (CI does)");
            let dir = TempDir::new(tag);
            let mnt = dir.path().join("disk");
            std::fs::create_dir(&mnt).unwrap();
            let mounted = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(&mnt)
                .status()
                .unwrap();
            assert!(mounted.success(), "mounting a tmpfs on {}", mnt.display());
            Self { dir, mnt }
        }

        pub fn path(&self) -> &Path {
            &self.mnt
        }

        /// Fill the disk with a file `filler` but for about `leave` bytes.
        pub fn fill_but(&self, leave: u64) -> PathBuf {
            let st = nix::sys::statvfs::statvfs(&self.mnt).unwrap();
            let free = st.blocks_available() * st.fragment_size();
            let filler = self.mnt.join("filler");
            std::fs::write(&filler, vec![b'x'; free.saturating_sub(leave) as usize]).unwrap();
            filler
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.mnt).status();
            let _ = &self.dir;
        }
    }
}
