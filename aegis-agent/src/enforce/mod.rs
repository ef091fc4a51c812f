//! Enforcement: acting on a verdict against live traffic, not just recording it.
//!
//! - [`sockdiag`]: cut established TCP connections to blocked destinations from user space
//!   (netlink sock_diag `SOCK_DESTROY`, what `ss -K` does).

pub mod sockdiag;
