//! Operator commands: `scan`, `rules test` and `kernel` run without the daemon;
//! [`control`]'s (`block`, `unblock`, `blocks`, `emergency`, `disable`, `status`) talk to it
//! over its control socket.

pub mod control;
pub mod kernel;
pub mod rules;
pub mod scan;
