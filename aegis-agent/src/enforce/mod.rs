//! Enforcement: acting on a verdict against live traffic, not just recording it.
//!
//! - [`connect`]: refuse or redirect connects and refuse UDP sends to blocked destinations
//!   in the kernel (cgroup connect4/6, sendmsg4/6 programs), scoped to a cgroup subtree or
//!   an executable, with kernel-side expiry; pinned so blocks outlive the agent.
//! - [`sockdiag`]: cut established TCP connections to blocked destinations from user space
//!   (netlink sock_diag `SOCK_DESTROY`, what `ss -K` does).
//! - [`verdict`]: stop a call whose verdict is block while it is on the wire.
//! - [`gate`]: refuse, in the kernel, the send of a TLS write whose plaintext holds a
//!   kernel keyword (sockops + sk_msg with the SSL_write probes), then cut that connection;
//!   and the SSL-to-socket index.
//! - [`providers`]: provider names to addresses (resolved, refreshed, learned).
//! - [`handler`]: the daemon's control handler: blocks to kernel rules, kills.

pub mod connect;
pub mod gate;
pub mod handler;

pub mod providers;
pub mod sockdiag;
pub mod verdict;
