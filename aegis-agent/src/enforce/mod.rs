//! Enforcement: acting on a verdict against live traffic, not just recording it.
//!
//! - [`connect`]: refuse connects and UDP sends to blocked destinations in the kernel
//!   (cgroup connect4/6, sendmsg4/6 programs), scoped to a cgroup subtree.
//! - [`sockdiag`]: cut established TCP connections to blocked destinations from user space
//!   (netlink sock_diag `SOCK_DESTROY`, what `ss -K` does).
//! - [`gate`]: refuse, in the kernel, the send of a TLS write whose plaintext holds a
//!   kernel keyword (sockops + sk_msg with the SSL_write probes), then cut that connection;
//!   and the SSL-to-socket index.

pub mod connect;
pub mod gate;
pub mod sockdiag;
