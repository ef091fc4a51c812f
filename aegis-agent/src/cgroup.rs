//! cgroup v2 paths, for every stage: which cgroup a process is in, and whether a cgroup is
//! within a scope (a tenant, a block's scope, the containment cgroup, a policy's tenant).
//!
//! A bottom module: it imports nothing of the crate.

/// Whether cgroup `path` is `scope` or below it, on a path-component boundary ("/a/b"
/// covers "/a/b/c", not "/a/bc"; "/" covers every cgroup; a trailing '/' on the scope is
/// ignored).
pub fn covers(scope: &str, path: &str) -> bool {
    let scope = scope.trim_end_matches('/');
    path == scope || path.strip_prefix(scope).is_some_and(|rest| rest.starts_with('/'))
}

/// The unified-hierarchy line of /proc/PID/cgroup ("0::/path").
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_cover_on_component_boundaries() {
        assert!(covers("/system.slice/app.service", "/system.slice/app.service"));
        assert!(covers("/system.slice/app.service/", "/system.slice/app.service/worker"));
        assert!(!covers("/system.slice/app.service", "/system.slice/app.service2"));
        assert!(covers("/", "/user.slice"));
        assert!(covers("/", "/"));
        assert!(covers("/a", "/a/b"));
        assert!(covers("/a", "/a"));
        assert!(!covers("/a", "/ab"));
        assert!(!covers("/a/b", "/a"));
    }

    #[test]
    fn the_unified_line_is_read() {
        let text = "12:pids:/legacy\n0::/user.slice/session-1.scope\n";
        assert_eq!(parse_proc_cgroup(text).as_deref(), Some("/user.slice/session-1.scope"));
        assert_eq!(parse_proc_cgroup("1:name=systemd:/x\n"), None);
    }
}
