//! Named points where the agent kills itself with SIGKILL, for fault tests: with
//! `AEGIS_FAILPOINTS=name,name2` in its environment, the agent dies at those points exactly
//! as a `kill -9` there would leave it. Unset (always, outside tests) a point costs one
//! load of a cached empty list.

use std::sync::OnceLock;

/// Die here when `name` is listed in `AEGIS_FAILPOINTS`.
pub fn hit(name: &str) {
    static ACTIVE: OnceLock<Vec<String>> = OnceLock::new();
    let active = ACTIVE.get_or_init(|| {
        std::env::var("AEGIS_FAILPOINTS")
            .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default()
    });
    if active.iter().any(|a| a == name) {
        tracing::error!(failpoint = name, "failpoint reached: killing this agent (AEGIS_FAILPOINTS)");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
