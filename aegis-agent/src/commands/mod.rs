//! Operator commands: `scan` and `rules test` run without the daemon; [`control`]'s
//! (`block`, `unblock`, `blocks`, `emergency`, `disable`, `status`) talk to it over its
//! control socket.

pub mod control;
pub mod rules;
pub mod scan;
