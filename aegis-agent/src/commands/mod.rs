//! Operator commands: `scan`, `rules test`, `kernel` and [`evidence`]'s (`key show`,
//! `log verify|prove|check-proof`, `evidence verify|ship|list|fetch`) and [`collector`]
//! (`aegis-agent collector`) and [`fleet`] (`fleet sign|publish|status|block|unblock|emergency`)
//! run without the daemon;
//! [`control`]'s (`block`, `unblock`, `blocks`, `emergency`, `disable`, `status`) talk to it
//! over its control socket.

pub mod collector;
pub mod control;
pub mod drill;
pub mod evidence;
pub mod fleet;
pub mod fleet_drill;
pub mod incident;
pub mod kernel;
pub mod rules;
pub mod scan;

/// Exit statuses: one meaning per number across every command, so that a script can tell
/// a usage mistake from an outcome (README "Exit status"). Usage errors take 64 (EX_USAGE
/// of sysexits.h) rather than clap's 2, which is `scan`'s block.
pub mod exit {
    /// Done: allowed, valid, no harmful call allowed, every capability available.
    pub const OK: u8 = 0;
    /// The answer is no: warn (`scan`), refused by the agent (control commands), tampered
    /// or invalid (`log`, `evidence`), a harmful call still allowed (`replay`), a failing
    /// example (`rules test`), a capability unavailable (`kernel`); for the commands
    /// without a finer status, failed.
    pub const NO: u8 = 1;
    /// `scan` only: block.
    pub const BLOCK: u8 = 2;
    /// Could not be done: an unreadable input, log or key, the agent or the collector
    /// could not be asked.
    pub const ERROR: u8 = 3;
    /// Bad arguments, found by clap or by the command before it did anything.
    pub const USAGE: u8 = 64;

    /// The exit statuses of top-level command `name`, for its `--help`.
    pub fn help(name: &str) -> &'static str {
        match name {
            "scan" => "Exit status: 0 allow, 1 warn, 2 block, 3 error (unreadable input or rulepack), 64 usage error.",
            "replay" => {
                "Exit status: 0 no harmful call is allowed, 1 one is still allowed, 3 the bundle could not be \
                 replayed, 64 usage error."
            }
            "rules" => {
                "Exit status: 0 every example and case passes, 1 one fails (or a pack is invalid), 64 usage error."
            }
            "kernel" => {
                "Exit status: 0 every capability is available, 1 one is unavailable (or the check failed), 64 usage \
                 error."
            }
            "key" | "log" | "evidence" => {
                "Exit status: 0 valid (or done), 1 tampered or invalid, 3 could not check (no such log, unreadable \
                 key, invalid value, the collector could not be asked), 64 usage error."
            }
            "drill" => {
                "Exit status: 0 every phase of every scenario passed (or done), 1 a phase failed or something was \
                 left behind, 3 the drill could not run (the agent could not be asked), 64 usage error."
            }
            "block" | "unblock" | "blocks" | "emergency" | "disable" | "enforce" | "status" => {
                "Exit status: 0 done, 1 refused by the agent, 3 the agent could not be asked, 64 usage error."
            }
            _ => "Exit status: 0 done, 1 failed, 64 usage error.",
        }
    }
}
