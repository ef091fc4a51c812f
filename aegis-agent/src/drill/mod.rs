//! Drills (`aegis-agent drill`): a synthetic incident run end to end against the running
//! agent, each phase of the playbook's 60-minute flow (detect, classify, contain, preserve
//! evidence, stabilise, recover) checked and timed.
//!
//! # Design
//!
//! - [`scenario`]: what a drill's incident is, as TOML data; the built-in ones are embedded
//!   (`packaging/drills/`), and a team's own copies run with `--scenario-file`.
//! - [`endpoint`]: a local TLS server in the OpenAI and Anthropic shapes (a primary whose
//!   answer the drill sets, and a fallback): no byte goes to a real provider.
//! - [`client`]: the drill's cgroup, made under the agent's `enforce.cgroup` so the kernel
//!   containment covers it, and the drill client run inside it (`curl`, which links the
//!   system OpenSSL the agent's probes see).
//! - [`run`]: the phases, and the guard that lifts every control the drill set, its mark
//!   and its cgroup on every path: an error, a failed phase, SIGINT or SIGTERM.
//! - [`report`]: the report (JSON and Markdown) and the history of drills.
//! - [`aggregate`]: many hosts' reports as one (which hosts failed which step, p50/p99).
//! - [`fleet`]: the drill a fleet policy carries, run on this host as a child of the agent.
//!
//! # Safety
//!
//! Everything a drill causes is marked as the drill's: the agent marks the calls of the
//! drill's cgroup and the refusals of its blocks (`control::drills`; only a control client
//! can start a drill), so records carry `drill`, incidents carry `drill` and a `[drill ...]`
//! title, and metrics count them in `aegis_drill_calls_total` instead of the real
//! families. Every control is scoped to the drill's cgroup (emergency mode for it, blocks
//! with its scope, a tenant block of it); its blocks expire by themselves after 15 minutes.
//! A drill killed with SIGKILL runs no guard: the agent lifts what it left once its
//! command's process is gone (`control::drills`), and the next drill removes its private
//! directory.

pub mod aggregate;
pub mod client;
pub mod endpoint;
pub mod fleet;
pub mod report;
pub mod run;
pub mod scenario;

/// A new drill id: `drill-` and the UTC time and 4 random hex digits.
pub fn new_id() -> String {
    let mut r = [0u8; 2];
    let _ = getrandom::fill(&mut r);
    let t = crate::clock::rfc3339_ms(crate::clock::now_unix_ms());
    let stamp: String = t.chars().filter(|c| c.is_ascii_digit()).take(14).collect();
    format!("drill-{stamp}-{:02x}{:02x}", r[0], r[1])
}

/// The history of drills: beside the incidents, which drills rehearse.
pub fn history_path(config: &crate::config::Config) -> std::path::PathBuf {
    config.incidents.dir.join("drills.jsonl")
}
