//! Operator commands: `scan`, `rules test`, `kernel` and [`evidence`]'s (`key show`,
//! `log verify|prove|check-proof`, `evidence verify|ship|list|fetch`) and [`collector`]
//! (`aegis-agent collector`) and [`fleet`] (`fleet sign|publish|status|block|unblock|emergency`)
//! run without the daemon;
//! [`control`]'s (`block`, `unblock`, `blocks`, `emergency`, `disable`, `status`) talk to it
//! over its control socket.

pub mod collector;
pub mod control;
pub mod evidence;
pub mod fleet;
pub mod incident;
pub mod kernel;
pub mod rules;
pub mod scan;
